"""Bias deltas as artifacts: what they record, which bases refuse them, apply and remove, serve, export."""

import json
import os
import shutil

import pytest
import torch
from conftest import cli
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
)

import generate
from bitfit import export
from bitfit.core.trainable import is_bias
from bitfit.errors import InputError
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.generation import generate_answers
from bitfit.model.loading import load_model_and_tokenizer
from bitfit.store.delta import apply_bias_delta, load_bias_delta, remove_bias_delta, save_bias_delta

PROBE = torch.tensor([[5, 17, 42, 99, 3, 250]])


def load_base(folder):
    model, _ = load_model_and_tokenizer(folder)
    return model.eval()


@torch.no_grad()
def logits(model):
    return model(PROBE).logits


def bias_names(model):
    return [name for name, _ in model.named_parameters() if is_bias(name)]


def save_trained_delta(folder, path, seed, steer_to, base_model=None):
    """Stand in for training: seeded random biases, and a final-norm bias that makes one token win.

    With tied embeddings, adding a multiple of a token's embedding after the last norm raises that
    token's logit at every position, so greedy answers repeat it: each delta says its own word.
    Returns the logits the base gives with this delta.
    """
    model, tokenizer = load_model_and_tokenizer(folder)
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in bias_names(model):
            params[name].copy_(torch.randn(params[name].shape, generator=generator) * 0.02)
        params["transformer.ln_f.bias"].copy_(1000 * model.transformer.wte.weight[
            tokenizer.convert_tokens_to_ids(steer_to)])
    save_bias_delta(path, model, bias_names(model), base_model=base_model or folder)
    return logits(model.eval())


@pytest.fixture(scope="module")
def deltas(tiny_model_dir, tmp_path_factory):
    """Two deltas for the tiny base, as {path: the logits the base gives with it}."""
    folder = tmp_path_factory.mktemp("deltas")
    return {str(folder / f"{name}.safetensors"):
            save_trained_delta(tiny_model_dir, folder / f"{name}.safetensors", seed, steer_to)
            for name, seed, steer_to in [("a", 1, "Par"), ("b", 2, "hant")]}


def other_model(kind, tiny_model_dir):
    """A model whose delta the tiny base must refuse, for the reason named by kind."""
    torch.manual_seed(1)
    if kind == "wrong class":
        return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64))
    overrides = {"missing tensor": {"n_layer": 3}, "shape": {"n_embd": 48},
                 "fingerprint": {}}[kind]  # same shapes, other weights
    return GPT2LMHeadModel(GPT2Config.from_pretrained(tiny_model_dir, **overrides))


# ----------------------------------------------------------------------------- the file


def test_metadata_records_base_class_tensors_and_fingerprint(tiny_model_dir, deltas):
    path = next(iter(deltas))
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
    base = load_base(tiny_model_dir)
    names = bias_names(base)
    assert metadata["format"] == "bitfit-bias-delta/2"
    assert metadata["base_model"] == tiny_model_dir
    assert metadata["model_class"] == "GPT2LMHeadModel"
    assert json.loads(metadata["tensors"]) == {
        name: {"shape": list(param.shape), "dtype": "float32"}
        for name, param in base.named_parameters() if name in names}
    assert metadata["base_fingerprint"] == base_fingerprint(base, names)
    assert len(metadata["base_fingerprint"]) == 16


def test_fingerprint_ignores_dtype_and_biases_but_sees_the_weights(tiny_model_dir):
    base = load_base(tiny_model_dir)
    names = bias_names(base)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    assert base_fingerprint(bf16, names) == base_fingerprint(base, names)
    fingerprint = base_fingerprint(base, names)
    with torch.no_grad():
        base.get_parameter(names[0]).add_(1.0)  # a delta tensor: not part of the base
        assert base_fingerprint(base, names) == fingerprint
        base.transformer.h[1].mlp.c_fc.weight[0, 0] += 0.5
    assert base_fingerprint(base, names) != fingerprint


@pytest.mark.parametrize("content", ["truncated", "not safetensors"])
def test_truncated_or_foreign_file_is_refused(content, deltas, tmp_path):
    data = open(next(iter(deltas)), "rb").read()
    path = tmp_path / "bias.safetensors"
    path.write_bytes(data[:len(data) // 2] if content == "truncated" else b"PK\x03\x04 a zip file")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_bias_delta(str(path))


# ----------------------------------------------------------------------- apply and remove


def test_apply_then_remove_restores_the_base_bit_exactly(tiny_model_dir, deltas):
    base = load_base(tiny_model_dir)
    before = {name: param.clone() for name, param in base.state_dict().items()}
    path, tuned_logits = next(iter(deltas.items()))
    previous = apply_bias_delta(base, *load_bias_delta(path))
    assert torch.equal(logits(base), tuned_logits)
    remove_bias_delta(base, previous)
    after = base.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_two_deltas_applied_in_turn_each_give_their_own_logits(tiny_model_dir, deltas):
    base = load_base(tiny_model_dir)
    base_logits = logits(base)
    for path, tuned_logits in deltas.items():
        previous = apply_bias_delta(base, *load_bias_delta(path))
        assert torch.equal(logits(base), tuned_logits)
        remove_bias_delta(base, previous)
        assert torch.equal(logits(base), base_logits)
    first, second = deltas.values()
    assert not torch.equal(first, second)


@pytest.mark.parametrize("kind, message", [
    ("wrong class", "trained on a GPTNeoXForCausalLM .* but the model is a GPT2LMHeadModel"),
    ("missing tensor", "holds 'transformer.h.2.attn.c_attn.bias', which the model does not have"),
    ("shape", "'transformer.h.0.attn.c_attn.bias' has shape \\(144,\\), the model's has \\(96,\\)"),
    ("fingerprint", "recorded base 'other/base' has fingerprint [0-9a-f]{16}, this base [0-9a-f]{16}"),
])
def test_delta_for_another_base_is_refused_and_force_overrides_only_the_fingerprint(
        kind, message, tiny_model_dir, tmp_path):
    other = other_model(kind, tiny_model_dir)
    save_bias_delta(tmp_path / "bias.safetensors", other, bias_names(other), base_model="other/base")
    tensors, metadata = load_bias_delta(str(tmp_path))
    base = load_base(tiny_model_dir)
    with pytest.raises(InputError, match=message):
        apply_bias_delta(base, tensors, metadata)
    if kind == "fingerprint":
        apply_bias_delta(base, tensors, metadata, force=True)
        assert torch.equal(base.transformer.h[0].ln_1.bias, other.transformer.h[0].ln_1.bias)
    else:
        with pytest.raises(InputError, match=message):
            apply_bias_delta(base, tensors, metadata, force=True)


def test_old_delta_without_fingerprint_applies_unchecked(tiny_model_dir, tmp_path):
    other = other_model("fingerprint", tiny_model_dir)
    tensors = {name: param.detach().clone() for name, param in other.named_parameters() if is_bias(name)}
    save_file(tensors, str(tmp_path / "bias.safetensors"),
              metadata={"format": "bitfit-bias-delta/1", "base_model": tiny_model_dir,
                        "model_class": "GPT2LMHeadModel"})
    base = load_base(tiny_model_dir)
    apply_bias_delta(base, *load_bias_delta(str(tmp_path)))  # other weights, but nothing to tell by
    assert torch.equal(base.transformer.ln_f.bias, other.transformer.ln_f.bias)


# ---------------------------------------------------------------------------- generate.py


def expected_output(tiny_model_dir, deltas, prompts):
    """What generate.py --compare should print, computed by applying each delta to its own fresh base."""
    columns = []
    for path in [None, *deltas]:
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
        if path:
            apply_bias_delta(model, *load_bias_delta(path))
        heading = f"With bias delta ({path})" if path else f"Base model ({tiny_model_dir})"
        columns.append((heading, generate_answers(model, tokenizer, prompts, max_new_tokens=4)))
    text = ""
    for number, (instruction, input) in enumerate(prompts, 1):
        title = "### Prompt" if len(prompts) == 1 else f"### Prompt {number} of {len(prompts)}"
        text += f"{title}\n{instruction}" + (f"\n{input}" if input else "") + "\n\n"
        text += "".join(f"### {heading}\n{answers[number - 1]}\n\n" for heading, answers in columns)
    return text


def test_generate_serves_two_deltas_from_one_base(tiny_model_dir, deltas, capsys):
    a, b = deltas
    status, out, err = cli(generate.main, ["--bias", a, "--bias", b, "--compare", "--prompt",
                                           "Name a large animal.", "--max-new-tokens", "4"], capsys)
    assert status == 0, err
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    base_answer, = generate_answers(model, tokenizer, [("Name a large animal.", "")], max_new_tokens=4)
    assert out == (f"### Prompt\nName a large animal.\n\n"
                   f"### Base model ({tiny_model_dir})\n{base_answer}\n\n"
                   f"### With bias delta ({a})\nParParParPar\n\n"  # each delta says its own word
                   f"### With bias delta ({b})\nhanthanthanthant\n\n")


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_generate_answers_a_prompts_file_in_batches(suffix, tiny_model_dir, deltas, tmp_path, capsys):
    prompts = [("Name three primary colors.", ""), ("Add the numbers.", "2 and 3"), ("List two fruits.", "")]
    file = tmp_path / f"prompts{suffix}"
    if suffix == ".txt":
        prompts = [(instruction, "") for instruction, _ in prompts]
        file.write_text("\n".join(instruction for instruction, _ in prompts) + "\n\n")
    else:
        file.write_text("".join(json.dumps({"instruction": i, "input": x}) + "\n" for i, x in prompts))
    argv = [arg for path in deltas for arg in ("--bias", path)]
    status, out, err = cli(generate.main, [*argv, "--compare", "--prompts", str(file), "--batch-size", "2",
                                           "--max-new-tokens", "4"], capsys)
    assert status == 0, err
    assert out == expected_output(tiny_model_dir, deltas, prompts)


def test_generate_refuses_deltas_from_different_bases_unless_model_is_given(tiny_model_dir, deltas, tmp_path,
                                                                           capsys):
    elsewhere = tmp_path / "elsewhere.safetensors"
    save_trained_delta(tiny_model_dir, elsewhere, seed=3, steer_to="Par", base_model="some/other-base")
    argv = ["--bias", next(iter(deltas)), "--bias", str(elsewhere), "--max-new-tokens", "2"]
    status, _, err = cli(generate.main, argv, capsys)
    assert status == 2
    assert err.count("\n") == 1 and "different bases (" in err and "--model" in err
    status, out, err = cli(generate.main, [*argv, "--model", tiny_model_dir], capsys)
    assert status == 0, err
    assert out.count("### With bias delta") == 2


def test_generate_refuses_a_delta_for_other_weights_unless_forced(tiny_model_dir, tmp_path, capsys):
    other = other_model("fingerprint", tiny_model_dir)
    save_bias_delta(tmp_path / "bias.safetensors", other, bias_names(other), base_model=tiny_model_dir)
    argv = ["--bias", str(tmp_path), "--max-new-tokens", "2"]
    status, out, err = cli(generate.main, argv, capsys)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "fingerprint" in err and f"(this base: {tiny_model_dir})" in err
    status, out, err = cli(generate.main, [*argv, "--force"], capsys)
    assert status == 0, err
    assert "### With bias delta" in out


@pytest.mark.parametrize("name, content, expected", [
    ("missing.txt", None, "prompts file not found"),
    ("empty.txt", "\n \n", "prompts file holds no prompts"),
    ("broken.json", "[{oops", "not valid JSON at line 1"),
    ("object.json", '{"instruction": "x"}', "expected a JSON list"),
    ("rows.jsonl", '{"instruction": "x"}\n{"input": "y"}\n', "row 2 has no instruction"),
])
def test_generate_rejects_a_bad_prompts_file_in_one_line(name, content, expected, tmp_path, capsys):
    file = tmp_path / name
    if content is not None:
        file.write_text(content)
    status, _, err = cli(generate.main, ["--prompts", str(file)], capsys)
    assert status == 2
    assert err.count("\n") == 1 and expected in err, err


# ------------------------------------------------------------------------------- export


def test_export_writes_a_model_folder_that_gives_the_tuned_logits(tiny_model_dir, deltas, tmp_path, capsys):
    path, tuned_logits = next(iter(deltas.items()))
    out = tmp_path / "merged"
    status, stdout, err = cli(export.main, ["--bias", path, "--out", str(out)], capsys)  # base from the delta
    assert status == 0, err
    assert f"wrote {out}" in stdout
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(logits(merged), tuned_logits, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).encode("Hello") == \
        AutoTokenizer.from_pretrained(tiny_model_dir).encode("Hello")


def test_export_rejects_bad_input_in_one_line(tiny_model_dir, deltas, tmp_path, capsys):
    path = next(iter(deltas))
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "todo.txt").write_text("keep me")
    cases = [
        (["--bias", str(tmp_path / "nope"), "--out", str(tmp_path / "x")], "bias delta not found"),
        (["--bias", path, "--out", str(not_a_model)], "holds files; choose a new or empty folder"),
        (["--bias", path, "--out", tiny_model_dir], "the base model's own folder"),
        (["--out", str(tmp_path / "x")], "the following arguments are required: --bias"),
    ]
    for argv, expected in cases:
        status, _, err = cli(export.main, argv, capsys)
        assert status == 2
        assert err.count("\n") == 1 and expected in err, err
    assert (not_a_model / "todo.txt").read_text() == "keep me"


# ----------------------------------------------------------- forged, diverged and occupied


def forged_delta(deltas, tmp_path, **changes):
    """A copy of a good delta with its tensors or metadata changed, written around bitfit's checks."""
    tensors, metadata = load_bias_delta(next(iter(deltas)))
    tensors = {**tensors, **changes.pop("tensors", {})}
    path = tmp_path / "forged.safetensors"
    save_file(tensors, str(path), metadata={**metadata, **changes})
    return str(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_generate_and_export_refuse_a_delta_holding_nan_or_inf(value, deltas, tmp_path, capsys):
    path = forged_delta(deltas, tmp_path, tensors={"transformer.ln_f.bias": torch.full((32,), value)})
    out = tmp_path / "merged"
    for main, argv in [(generate.main, ["--bias", path, "--max-new-tokens", "2"]),
                       (export.main, ["--bias", path, "--out", str(out)])]:
        status, stdout, err = cli(main, argv, capsys)
        assert status == 2
        assert err.count("\n") == 1 and "'transformer.ln_f.bias' holds NaN or inf values" in err, err
        assert "### With bias delta" not in stdout
    assert not out.exists() and list(tmp_path.glob(".merged*")) == []


@pytest.mark.parametrize("added", ['{"not": "a list"}', "not json", "[1, 2]"])
def test_a_delta_whose_added_biases_are_not_a_list_of_names_is_refused(added, deltas, tmp_path, capsys):
    path = forged_delta(deltas, tmp_path, added_biases=added)
    status, _, err = cli(generate.main, ["--bias", path, "--max-new-tokens", "2"], capsys)
    assert status == 2
    assert err.count("\n") == 1 and "added_biases metadata is not a JSON list" in err, err


def test_export_refuses_a_folder_of_the_users_and_overwrite_swaps_a_new_export_in_for_an_old_one(tiny_model_dir, deltas,
                                                                                   tmp_path, capsys):
    path, tuned_logits = next(iter(deltas.items()))
    out = tmp_path / "merged"
    shutil.copytree(tiny_model_dir, out)  # another model, and a user's notes beside it
    (out / "notes.txt").write_text("keep me")
    before = {file.name: file.read_bytes() for file in out.iterdir()}
    status, _, err = cli(export.main, ["--bias", path, "--out", str(out)], capsys)
    assert status == 2 and err.count("\n") == 1 and "--out" in err and "--overwrite" in err, err
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before

    # --overwrite replaces only an earlier export: not a folder of the user's, whatever it holds.
    status, _, err = cli(export.main, ["--bias", path, "--out", str(out), "--overwrite"], capsys)
    assert status == 2 and err.count("\n") == 1 and "which no export wrote" in err, err
    assert {file.name: file.read_bytes() for file in out.iterdir()} == before

    shutil.rmtree(out)
    assert cli(export.main, ["--bias", path, "--out", str(out)], capsys)[0] == 0
    earlier = sorted(file.name for file in out.iterdir())
    status, _, err = cli(export.main, ["--bias", path, "--out", str(out), "--overwrite"], capsys)
    assert status == 0, err
    assert sorted(file.name for file in out.iterdir()) == earlier  # the earlier export, replaced whole
    torch.testing.assert_close(logits(AutoModelForCausalLM.from_pretrained(out)), tuned_logits, rtol=0, atol=0)
    assert sorted(file.name for file in tmp_path.iterdir() if file.name.startswith(".merged")) == []
    assert {oct(file.stat().st_mode & 0o777) for file in out.iterdir()} == {oct(0o666 & ~current_umask())}


def test_generate_and_export_refuse_a_truncated_base_in_one_line(tiny_model_dir, deltas, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base)
    weights = (base / "model.safetensors").read_bytes()
    (base / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    path = next(iter(deltas))
    for main, argv in [(generate.main, ["--model", str(base), "--max-new-tokens", "2"]),
                       (export.main, ["--model", str(base), "--bias", path, "--out", str(tmp_path / "merged")])]:
        status, _, err = cli(main, argv, capsys)
        assert status == 2
        assert err.count("\n") == 1 and "could not load model" in err, err


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
