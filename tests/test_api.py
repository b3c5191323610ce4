"""The public API: `import bitfit` names the pieces, and the README's snippet runs as written."""

import re
import subprocess
import sys

import torch
from conftest import ROOT
from safetensors.torch import load_file

import bitfit
from bitfit.core.trainable import is_bias
from bitfit.model.loading import load_model_and_tokenizer


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    return re.search(r"## bitfit from Python\n.*?```python\n(.*?)```", readme, re.DOTALL).group(1)


def test_the_readme_snippet_runs_and_does_what_it_says(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # it writes a delta, a merged model folder and a run folder here
    names = {}
    exec(compile(readme_snippet(), "README.md (bitfit from Python)", "exec"), names)

    assert "loss sum" in capsys.readouterr().out
    base, _ = load_model_and_tokenizer("builtin:tiny-gpt2")
    base_params = dict(base.named_parameters())
    delta = load_file(tmp_path / "bias.safetensors")
    assert sorted(delta) == sorted(name for name in base_params if is_bias(name)) == sorted(names["trained"])
    for name, tensor in delta.items():
        assert not torch.equal(tensor, base_params[name]), f"{name} did not train"
    merged = dict(load_model_and_tokenizer(str(tmp_path / "merged"))[0].named_parameters())
    for name, param in base_params.items():
        torch.testing.assert_close(merged[name], delta.get(name, param), rtol=0, atol=0)
    assert names["summary"]["optimizer_steps"] == 2
    assert (tmp_path / "runs" / "notebook" / "bias.safetensors").is_file()


def test_every_public_name_is_there():
    for name in bitfit.__all__:
        assert getattr(bitfit, name) is not None, name
    from bitfit.core.step import train_step
    from bitfit.training.run import run

    assert bitfit.train is run and bitfit.train_step is train_step


def test_importing_bitfit_loads_no_torch():
    """The command-line tools import bitfit.cli (and so bitfit) before anything else: --help and
    flag errors must answer without the seconds that loading torch takes."""
    check = "import sys, bitfit, bitfit.cli; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[]", result.stderr
