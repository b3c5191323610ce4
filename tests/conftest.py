"""Shared fixtures: a tiny GPT-2 and tokenizer saved to a temp folder, and small alpaca files.

The model is saved and reloaded so that tests go through the real from_pretrained path.
Dropout is off so that runs are deterministic and equivalences hold to float rounding.
"""

import json
import os
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitfit.model.known import DEFAULT_DIR, MODELS  # noqa: E402
from bitfit.model.tiny import tiny_gpt2_config, train_tokenizer  # noqa: E402

ROWS = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 plus 3 is 5."},
    {"instruction": "Give the opposite of the word.", "input": "cold", "output": "The opposite of cold is hot."},
    {"instruction": "Say hello politely.", "input": "", "output": "Hello, it is a pleasure to meet you."},
    {"instruction": "List two fruits.", "input": "", "output": "Apples and pears."},
    {"instruction": "Rewrite the sentence in the past tense.", "input": "I walk to school.",
     "output": "I walked to school."},
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Count the words.", "input": "one two three four", "output": "There are four words."},
    {"instruction": "Explain what a bias term is in one sentence.", "input": "",
     "output": "A bias is a learned constant added to a layer's output, shifting it without "
               "looking at the input."},
    {"instruction": "Name a large animal.", "input": "", "output": "The elephant."},
]


@pytest.fixture(scope="session")
def tokenizer_texts():
    texts = []
    for row in ROWS:
        texts += [row["instruction"], row["input"], row["output"], "Human: \n\nAssistant: "]
    return texts * 4


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_texts):
    """A 2-layer GPT-2 (random weights, dropout off) and its tokenizer, saved to disk."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    return save_gpt2(folder, train_tokenizer(tokenizer_texts, vocab_size=400), width=32)


def save_gpt2(folder, tokenizer, width: int) -> str:
    """A 2-layer GPT-2 of the given width (random weights and biases, dropout off) and tokenizer, saved to folder."""
    from transformers import GPT2LMHeadModel

    config = tiny_gpt2_config(tokenizer, n_positions=128, n_embd=width, n_layer=2, n_head=2,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    # Random init leaves biases at zero; give them values so tests can see them move and reload.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


# The real model, where `python -m bitfit.fetch smollm2-135m-instruct` leaves it in the repository.
REAL_MODEL = "smollm2-135m-instruct"
REAL_MODEL_GGUF = ROOT / DEFAULT_DIR / MODELS[REAL_MODEL].file_name
REAL_MODEL_DIR = ROOT / DEFAULT_DIR / REAL_MODEL
REQUIRE_REAL_MODEL = "BITFIT_REQUIRE_REAL_MODEL"  # set by .ci/run


@pytest.fixture(scope="session")
def real_model():
    """(GGUF file, converted folder) of SmolLM2-135M-Instruct. Where it has not been fetched the
    tests that need it skip, except under REQUIRE_REAL_MODEL (CI), where they fail: a skip there
    would pass a suite that never tested the real model."""
    if not (REAL_MODEL_GGUF.is_file() and (REAL_MODEL_DIR / "config.json").is_file()):
        message = f"the real model is not fetched: python -m bitfit.fetch {REAL_MODEL}"
        if os.environ.get(REQUIRE_REAL_MODEL):
            pytest.fail(f"{message} ({REQUIRE_REAL_MODEL} is set)")
        pytest.skip(message)
    return str(REAL_MODEL_GGUF), str(REAL_MODEL_DIR)


def save_tiny(folder, config_class, tokenizer_dir):
    """A 2-layer model of config_class (random weights) with the tiny GPT-2's tokenizer, saved to folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = config_class(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                          bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def llama_dir(tiny_model_dir, tmp_path_factory):
    """A 2-layer LLaMA (no bias anywhere, RMSNorm without one too) with the tiny GPT-2's tokenizer."""
    from transformers import LlamaConfig

    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), LlamaConfig, tiny_model_dir)


@pytest.fixture
def alpaca_file(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    return str(path)


def prepare_for_training(model, config, device):
    """The setup steps of a run (bitfit.training.setup.setup_model), quietly, for tests that train a
    model they loaded: returns (names of the trained tensors, optimizer)."""
    from bitfit.training.setup import setup_model

    setup = setup_model(model, config, device, log=lambda line: None)
    return setup.trained_names, setup.optimizer


TIMING = {"seconds", "tokens_per_s"}  # metrics.jsonl keys that differ from run to run


def metric_lines(folder):
    """The lines of a run's metrics.jsonl, without the timing keys."""
    lines = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k not in TIMING} for line in lines]


def assert_same_metric_lines(got: list[dict], expected: list[dict], rel: float) -> None:
    """Line by line: the same keys (an eval line has no "loss", a training line no "eval_loss"),
    integers (step, samples, tokens) equal, floats equal to within rel."""
    assert [sorted(line) for line in got] == [sorted(line) for line in expected]
    for got_line, expected_line in zip(got, expected):
        for key, value in expected_line.items():
            if isinstance(value, float):
                assert got_line[key] == pytest.approx(value, rel=rel), (key, got_line)
            else:
                assert got_line[key] == value, (key, got_line)


def cli(main, argv, capsys):
    """Run a command-line main in-process; return (exit status, stdout, stderr)."""
    from bitfit.cli import run_main

    try:
        status = run_main(main, argv)
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="session")
def finished_run_template(tmp_path_factory, tiny_model_dir):
    """A finished run (with the checkpoint --save-every leaves at its end), made once."""
    import train
    from bitfit.cli import run_main

    folder = tmp_path_factory.mktemp("earlier")
    data = folder / "rows.json"
    data.write_text(json.dumps(ROWS))
    status = run_main(train.main, ["--model", tiny_model_dir, "--data", str(data), "--max-steps", "2",
                                   "--batch-size", "2", "--grad-accum", "1", "--log-every", "1", "--save-every",
                                   "2", "--output-dir", str(folder / "run")])
    assert status == 0
    return folder / "run"


@pytest.fixture
def earlier_run(finished_run_template, tmp_path):
    """A copy of a finished run in tmp_path/run: the folder a later run must not damage."""
    folder = tmp_path / "run"
    shutil.copytree(finished_run_template, folder)
    return folder


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under folder, by its path relative to folder: to compare byte for byte."""
    folder = Path(folder)
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def leftovers(folder) -> list[str]:
    """What a run into folder left beside it besides its lock file: staging or retired folders."""
    folder = Path(folder)
    return sorted(path.name for path in folder.parent.iterdir()
                  if path.name.startswith(f".{folder.name}.") and path.name != f".{folder.name}.lock")


def error_lines(err: str) -> list[str]:
    """stderr's lines without tqdm's progress bars."""
    return [line for line in err.splitlines() if line.strip() and "%|" not in line]


# ------------------------------------------------------------ a tiny LLaMA as a GGUF file

# A turn ends with the tokenizer's one special token, as ChatML's end with <|im_end|>.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|endoftext|>\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant: {% endif %}")


def write_llama_gguf(path, model, tokenizer) -> None:
    """Write a LLaMA and its byte-level BPE tokenizer in F32 as llama.cpp's converter does: GGUF
    tensor names, the query and key rows reordered for its rotary layout, no output.weight when tied."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge
                             for merge in backend["model"]["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        array = tensor.float().numpy()
        if base.endswith("q_proj"):
            array = llama_cpp_rotary_order(array, config.num_attention_heads)
        elif base.endswith("k_proj"):
            array = llama_cpp_rotary_order(array, config.num_key_value_heads)
        writer.add_tensor(f"{names.get_name(base)}.{suffix}", np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def llama_cpp_rotary_order(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows (its rotary pairs adjacent dimensions)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


@pytest.fixture(scope="session")
def llama(tiny_model_dir):
    """A 2-layer LLaMA with grouped-query attention and tied embeddings, random weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval(), tokenizer


@pytest.fixture(scope="session")
def gguf_path(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"
    write_llama_gguf(path, *llama)
    return str(path)


# ------------------------------------------------------------ helpers several test files share


def llama_cpp_server(path, context: int = 64, threads: int = 1):
    """llama.cpp, through the xllamacpp wheel, serving the GGUF file at path (in this process)."""
    xllamacpp = pytest.importorskip("xllamacpp")
    params = xllamacpp.CommonParams()
    params.model.path = str(path)
    params.n_ctx = context
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.warmup = False
    return xllamacpp.Server(params)


def ctrl_c_after_step(monkeypatch, step: int):
    """As if the user pressed Ctrl-C during optimizer step `step`: SIGINT once its metrics line is written.
    Returns a function that takes the patch off again (before a run is resumed)."""
    import signal

    from bitfit.store.metrics import MetricsLog

    write = MetricsLog.write

    def pressed(self, record):
        write(self, record)
        if record["step"] == step and "loss" in record:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", pressed)
    return lambda: monkeypatch.setattr(MetricsLog, "write", write)
