"""--fsdp: two CPU processes under torchrun (gloo) shard tiny models, and train exactly as one process does.

Every sharded run happens in one torchrun launch (fsdp_driver.py), started once for the module; each
test compares a run from it with a run in this process at twice the micro-batch: 2 ranks x 4 == 1 x 8.
The 9 training rows make each step's second global micro-batch a single example, so rank 1 has
none of it and must run an idle micro-batch for the ranks' gathers to meet.
"""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import ROOT, ROWS, assert_same_metric_lines, metric_lines, prepare_for_training, save_gpt2, save_tiny
from safetensors import safe_open
from safetensors.torch import load_file
from torchao.quantization import NF4Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

import train
from bitfit.cli import run_main
from bitfit.config import TrainConfig
from bitfit.core.examples import collate
from bitfit.core.loss import label_token_count
from bitfit.core.step import train_step
from bitfit.core.trainable import trainable_parameters
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.model.quantize import quantize_frozen_weights
from bitfit.parallel.fsdp import describe_4bit_shards
from bitfit.parallel.torchrun import TorchrunWorld
from bitfit.store.metrics import tensor_bytes
from bitfit.store.run_folder import RunFolder
from bitfit.training.setup import setup_model

CPU = torch.device("cpu")
NF4_SPLIT = ("quantized_data", "quantized_scalers", "quantization_factor")  # what FSDP splits of a 4-bit weight
LLAMA_SHAPES = {  # Llama-2-7b's and SmolLM2-135M's layers (2 of them: every layer has the same shapes)
    "llama-7b": LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                            num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True),
}
COMMON = ["--grad-accum", "2", "--max-steps", "2", "--eval-size", "1", "--log-every", "1", "--device", "cpu"]
# name -> flags of both runs; the sharded one adds --fsdp --batch-size 4, the reference --batch-size 8.
CASES = {
    "bitfit": ["--save-every", "2"],
    "full": ["--mode", "full", "--grad-checkpointing"],
    # Two slices of GPT-2's fused q,k,v bias, one in each rank's shard; the untouched one spans both.
    "slices": ["--bias-terms", "query,value"],
    "llama": ["--add-biases"],  # the model is the tiny LLaMA: no biases of its own, an untied head
    # Each rank's 8 examples of a window re-cut into micro-batches of 3 (3, 3 and 2; a short last window
    # leaves one rank fewer, and idle micro-batches make up the count every rank must run).
    "micro": ["--micro-batch", "3"],
}
# bf16 through FSDP's MixedPrecisionPolicy: the same as one process to bf16's rounding, not exactly (one
# micro-batch of 8 rounds differently from two of 4; full mode computes with bf16 copies of its norms too).
BF16_CASES = {"bitfit-bf16": ["--dtype", "bf16"], "full-bf16": ["--mode", "full", "--dtype", "bf16"]}
ALL_CASES = {**CASES, **BF16_CASES}
# Resuming: 4 steps straight, and the same run stopped by Ctrl-C after step 2 and resumed to 4.
RESUMED = {"bitfit": ["--bias-terms", "query,value"], "full": ["--mode", "full"]}
# Resuming a model with dropout (the built-in GPT-2's 0.1): each rank draws its own masks, so each rank's random
# state must come back. Plain torchrun and --fsdp, 4 steps straight against stopped after 2 and resumed.
DROPOUT = {"dropout-torchrun": [], "dropout-fsdp": ["--fsdp"]}
# --quantize nf4 on a GPT-2 of width 128, stopped by Ctrl-C after step 2 and resumed to 4. Its MLP weights
# (512 x 128 and 128 x 512: 1,024 blocks of 64, 4 groups of 256 block scales) split into two shards of whole
# groups; its attention weights do not (384 x 128: 3 groups; 128 x 128: 1), so every rank keeps them whole.
NF4 = ["--quantize", "nf4", "--grad-accum", "2", "--max-steps", "4", "--save-every", "2", "--eval-size", "1",
       "--log-every", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """Run every case under torchrun with --fsdp in one launch; return the folder of their run folders."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "rows.json").write_text(json.dumps(ROWS))
    llama = save_tiny(root / "tiny-llama", LlamaConfig, tiny_model_dir)
    save_gpt2(root / "wide-gpt2", AutoTokenizer.from_pretrained(tiny_model_dir), width=128)
    cases = [{"argv": fsdp_flags(root, name, tiny_model_dir, llama) + ["--output-dir", str(root / name)]}
             for name in ALL_CASES]
    for mode, flags in RESUMED.items():
        argv = data_flags(root, tiny_model_dir) + ["--fsdp", "--batch-size", "4", "--grad-accum", "2",
                                                   "--max-steps", "4", "--save-every", "2", "--log-every", "1",
                                                   "--device", "cpu"] + flags
        cases += [{"argv": argv + ["--output-dir", str(root / f"{mode}-straight")]},
                  {"argv": argv + ["--output-dir", str(root / f"{mode}-stopped")], "ctrl_c_after_step": 2},
                  {"argv": ["--resume", str(root / f"{mode}-stopped")]}]
    for name, flags in DROPOUT.items():
        argv = ["--data", str(root / "rows.json"), "--batch-size", "2", "--grad-accum", "2", "--max-steps", "4",
                "--save-every", "2", "--log-every", "1", "--device", "cpu"] + flags  # the built-in model
        cases += [{"argv": argv + ["--output-dir", str(root / f"{name}-straight")]},
                  {"argv": argv + ["--output-dir", str(root / f"{name}-stopped")], "ctrl_c_after_step": 2},
                  {"argv": ["--resume", str(root / f"{name}-stopped")]}]
    nf4 = nf4_flags(root, tiny_model_dir) + ["--fsdp", "--batch-size", "4", "--output-dir", str(root / "nf4")]
    cases += [{"argv": nf4, "ctrl_c_after_step": 2}, {"argv": ["--resume", str(root / "nf4")]}]
    (root / "cases.json").write_text(json.dumps(cases))
    workdir = root / "workdir"
    workdir.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(torchrun + [str(ROOT / "tests" / "fsdp_driver.py"), str(root / "cases.json"),
                                        str(root)],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert list(workdir.iterdir()) == []  # nothing was written where the ranks were started
    # Rank 0's summaries only: one per finished run (a run stopped by Ctrl-C has none).
    assert result.stdout.count("optimizer steps") == len(ALL_CASES) + 2 * len(RESUMED) + 2 * len(DROPOUT) + 1
    (root / "stdout.txt").write_text(result.stdout)
    return root


def nf4_flags(root, tiny_model_dir):
    return data_flags(root, tiny_model_dir, str(root / "wide-gpt2")) + NF4


def data_flags(root, tiny_model_dir, model=None):
    return ["--model", model or tiny_model_dir, "--data", str(root / "rows.json")]


def fsdp_flags(root, name, tiny_model_dir, llama):
    model = llama if name == "llama" else tiny_model_dir
    return data_flags(root, tiny_model_dir, model) + COMMON + ALL_CASES[name] + ["--fsdp", "--batch-size", "4"]


def reference_run(runs, name, tiny_model_dir, tmp_path):
    """The same case in this process at --batch-size 8; returns its run folder."""
    model = str(runs / "tiny-llama") if name == "llama" else tiny_model_dir
    folder = tmp_path / name
    argv = data_flags(runs, tiny_model_dir, model) + COMMON + ALL_CASES[name] + ["--batch-size", "8",
                                                                              "--output-dir", str(folder)]
    assert run_main(train.main, argv) == 0
    return folder


def saved_tensors(folder):
    return load_file(folder / "bias.safetensors") if (folder / "bias.safetensors").exists() else \
        load_file(folder / "model" / "model.safetensors")


def summary(folder):
    return json.loads((folder / "summary.json").read_text())


def assert_same_run(sharded, single, atol=1e-6):
    """The same tensors saved (to 1e-5), metrics lines and counts; the sharded one sharded."""
    expected, got = saved_tensors(single), saved_tensors(sharded)
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=atol)
    assert_same_metric_lines(metric_lines(sharded), metric_lines(single), rel=1e-5)
    for key in ("optimizer_steps", "samples", "tokens", "label_tokens", "trainable_params", "total_params"):
        assert summary(sharded)[key] == summary(single)[key], key
    assert (summary(sharded)["fsdp"], summary(single)["fsdp"]) == (True, False)


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_at_batch_4_with_fsdp_train_like_one_process_at_batch_8(name, runs, tiny_model_dir, tmp_path):
    single = reference_run(runs, name, tiny_model_dir, tmp_path)
    assert_same_run(runs / name, single)
    # Each rank holds about half the parameter bytes (shards are padded to equal sizes).
    whole, = summary(single)["parameter_bytes_per_rank"]
    assert all(0.5 <= share / whole < 0.55 for share in summary(runs / name)["parameter_bytes_per_rank"])
    if name == "full":  # the same Hugging Face model folder: tied head written once, the class's own name
        assert sorted(path.name for path in (runs / name / "model").iterdir()) == \
            sorted(path.name for path in (single / "model").iterdir())
        config = json.loads((runs / name / "model" / "config.json").read_text())
        assert config["architectures"] == ["GPT2LMHeadModel"]
    else:  # the same delta: the class, the base's fingerprint and the biases --add-biases created
        files = [safe_open(str(folder / "bias.safetensors"), "pt") for folder in (runs / name, single)]
        metadata = [file.metadata() for file in files]
        assert metadata[0] == metadata[1]


@pytest.mark.parametrize("name, tolerance", [("bitfit-bf16", 1e-4), ("full-bf16", 1e-3)])
def test_bf16_with_fsdp_trains_like_one_process_to_bf16_rounding(name, tolerance, runs, tiny_model_dir, tmp_path):
    single = reference_run(runs, name, tiny_model_dir, tmp_path)
    expected, got = saved_tensors(single), saved_tensors(runs / name)
    for key, tensor in expected.items():
        assert got[key].dtype == tensor.dtype == torch.float32, key  # trained tensors stay fp32 masters
        torch.testing.assert_close(got[key], tensor, rtol=0, atol=tolerance)
    assert summary(runs / name)["train_loss"] == pytest.approx(summary(single)["train_loss"], rel=1e-4)


def test_nf4_with_fsdp_stopped_and_resumed_trains_like_one_process(runs, tiny_model_dir, tmp_path):
    """2 ranks x 4 with --fsdp --quantize nf4, stopped after step 2 and resumed to 4 == 1 process x 8 with
    --quantize nf4, 4 steps straight. The biases agree to 1e-5 (measured: 1.9e-6 after 2 steps, 3.9e-6 after
    4; without nf4 this model's biases differ by 1.6e-6 after 2 steps: AdamW enlarges the rounding of near-zero
    gradients summed in another order). The held-out loss before training, computed on every rank over the
    whole held-out row with the gathered 4-bit weights, is the one process's (measured: to the last bit)."""
    single = tmp_path / "single"
    argv = nf4_flags(runs, tiny_model_dir) + ["--batch-size", "8", "--output-dir", str(single)]
    assert run_main(train.main, argv) == 0
    assert_same_run(runs / "nf4", single, atol=1e-5)
    assert summary(runs / "nf4")["eval_loss_before"] == pytest.approx(summary(single)["eval_loss_before"], rel=1e-7)
    metadata = [safe_open(str(folder / "bias.safetensors"), "pt").metadata() for folder in (runs / "nf4", single)]
    assert metadata[0] == metadata[1] and metadata[0]["quantized_base"] == "nf4"
    assert [path.name for path in (runs / "nf4").glob("sharded-step-*")] == ["sharded-step-4"]


def test_nf4_shards_hold_half_of_each_4bit_weight_that_splits_and_the_rest_whole(runs):
    """Each rank's parameter bytes, worked out from the model quantized in this process: half of every
    tensor but the attention's 4-bit weights, which stay whole; each 4-bit shard keeps its weight's mean
    and 16-entry code table, which torchao does not split. The run names the weights it keeps whole."""
    model, _ = load_model_and_tokenizer(str(runs / "wide-gpt2"))
    quantize_frozen_weights(model, CPU)
    expected = 0
    for name, param in model.named_parameters():
        if not isinstance(param, NF4Tensor):
            expected += tensor_bytes(param) // 2
        elif ".attn." in name:
            expected += tensor_bytes(param)
        else:
            split = sum(tensor_bytes(getattr(param, part)) for part in NF4_SPLIT)
            expected += split // 2 + tensor_bytes(param.scaler_mean) + tensor_bytes(param.nf4)
    assert summary(runs / "nf4")["parameter_bytes_per_rank"] == [expected, expected]
    assert 0.5 < expected / summary(runs / "nf4")["weight_bytes"] < 0.6
    assert ("--fsdp: 4 of the 8 weights held in 4 bits stay whole on every rank, their rows or groups of scales "
            "not dividing by 2: 2 of 384 x 128 in 3 groups (transformer.h.0.attn.c_attn.weight, ...), 2 of 128 x "
            "128 in 1 group (transformer.h.0.attn.c_proj.weight, ...)") in (runs / "stdout.txt").read_text()


@pytest.mark.parametrize("shape, ranks, line", [
    ("llama-7b", 8, "each of the 14 weights held in 4 bits is sharded over the 8 ranks"),
    # SmolLM2-135M's MLP weights (1536 x 576) have 13,824 blocks of 64: 54 groups of 256 scales, not a multiple
    # of 8; its key and value weights (192 x 576) have 8 groups of 216, so no count above 2 splits them all.
    ("smollm2-135m", 8, "6 of the 14 weights held in 4 bits stay whole on every rank, their rows or groups of "
                        "scales not dividing by 8: 4 of 1536 x 576 in 54 groups (model.layers.0.mlp.gate_proj."
                        "weight, ...), 2 of 576 x 1536 in 54 groups (model.layers.0.mlp.down_proj.weight, ...); "
                        "all would shard over 2 ranks"),
    ("smollm2-135m", 2, "each of the 14 weights held in 4 bits is sharded over the 2 ranks"),
], ids=["llama-7b-8-ranks", "smollm2-8-ranks", "smollm2-2-ranks"])
def test_which_4bit_weights_of_real_shapes_shard(shape, ranks, line):
    """Built on the meta device from each shape: LLaMA's layers split over 8 ranks into whole groups of
    QLoRA's 256 block scales; a run names the weights that cannot, and the rank counts that split them all."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LLAMA_SHAPES[shape], dtype=torch.bfloat16)
    quantize_frozen_weights(model, torch.device("meta"))
    assert describe_4bit_shards(model, ranks) == f"--fsdp: {line}"


def test_the_untouched_slice_of_a_sharded_fused_bias_stays_bit_identical(runs, tiny_model_dir):
    """--bias-terms query,value trains the first and last thirds of c_attn's 96 entries; rank 0's shard
    holds [0:48] and rank 1's [48:96], so each rank masks its own part of the key slice, [32:64]."""
    base = dict(AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters())
    for name, tensor in load_file(runs / "slices" / "bias.safetensors").items():
        before = base[name].detach()
        assert torch.equal(tensor[32:64], before[32:64]), name
        assert (tensor[:32] != before[:32]).all() and (tensor[64:] != before[64:]).all(), name


@pytest.mark.parametrize("mode", RESUMED)
def test_a_sharded_run_stopped_at_step_2_and_resumed_to_4_equals_4_straight(mode, runs):
    straight, resumed = runs / f"{mode}-straight", runs / f"{mode}-stopped"
    expected, got = saved_tensors(straight), saved_tensors(resumed)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7)
    assert metric_lines(resumed) == metric_lines(straight)
    assert summary(resumed)["train_loss"] == pytest.approx(summary(straight)["train_loss"], rel=1e-6)
    # Each rank wrote its shards with torch.distributed.checkpoint; checkpoint.pt names the last folder.
    shards = sorted(path.name for path in (resumed / "sharded-step-4").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert [path.name for path in resumed.glob("sharded-step-*")] == ["sharded-step-4"]


@pytest.mark.parametrize("name", DROPOUT)
def test_with_dropout_a_resumed_run_on_two_ranks_equals_a_straight_one(name, runs):
    """Each rank's random state is in the checkpoint (rank 1's too, which never writes): the dropout
    masks after the resume are the straight run's, so the biases and the metrics are too."""
    straight, resumed = runs / f"{name}-straight", runs / f"{name}-stopped"
    expected, got = saved_tensors(straight), saved_tensors(resumed)
    for tensor_name, tensor in expected.items():
        torch.testing.assert_close(got[tensor_name], tensor, rtol=0, atol=1e-7)
    assert metric_lines(resumed) == metric_lines(straight)
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert len(state["rng_per_rank"]) == 2
    assert not torch.equal(state["rng_per_rank"][0]["torch"], state["rng_per_rank"][1]["torch"])


def test_only_rank_0_writes_the_run_folder(runs, tiny_model_dir, tmp_path):
    """Rank 1 wrote nothing but its shards of the checkpoints; each run folder holds what one
    process writes (and the folder of shards beside checkpoint.pt)."""
    writes = json.loads((runs / "rank1_writes.json").read_text())
    assert writes, "the audit hook saw nothing: it is not watching"
    assert all("/sharded-step-" in path for path in writes), writes
    assert any(path.endswith("__1_0.distcp") for path in writes)
    single = reference_run(runs, "bitfit", tiny_model_dir, tmp_path)
    assert sorted(path.name for path in (runs / "bitfit").iterdir()) == \
        sorted([path.name for path in single.iterdir()] + ["sharded-step-2"])


def test_the_run_folder_keeps_the_shards_its_checkpoint_names(tmp_path):
    """A run folder holding a folder of shards is a run's own; a resumed run taking over a stopped
    run's staging folder keeps them with its checkpoint (and drops what it was writing)."""
    run, staging = tmp_path / "run", tmp_path / ".run.staging"
    for folder, shards in ((run, "sharded-step-2"), (staging, "sharded-step-4")):
        (folder / shards).mkdir(parents=True)
        (folder / shards / "__0_0.distcp").write_bytes(b"shard")
        for name in ("train_config.json", "checkpoint.pt"):
            (folder / name).write_text("{}")
    (staging / "model").mkdir()
    with RunFolder(str(run), log=lambda message: None) as folder:
        folder.open(resuming=True)
        folder.stage(resuming=True)
    kept = sorted(path.name for path in staging.iterdir())
    assert kept == ["checkpoint.pt", "sharded-step-4", "train_config.json"]
    assert (staging / "sharded-step-4" / "__0_0.distcp").read_bytes() == b"shard"


def test_fsdp_without_torchrun_is_refused(tiny_model_dir, alpaca_file, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--data", alpaca_file, "--fsdp", "--output-dir", str(tmp_path / "run")]
    assert run_main(train.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--fsdp shards the model over several processes" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"dtype": "fp16"}, "use --dtype bf16"),
    ({"compile": True}, "--fsdp with --compile"),
])
def test_fsdp_refuses_what_it_does_not_support(overrides, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(fsdp=True, **overrides)


def test_gradients_are_reduced_once_per_optimizer_step_not_once_per_micro_batch(tiny_model_dir, tmp_path):
    """FSDP reduces the gradients in every backward pass unless told not to; train_step lets only the
    last micro-batch's do it. Counted in a one-process group, where each reduction still ends with
    FSDP putting the shard's gradient in place and running the hooks after accumulation."""
    config = TrainConfig(model=tiny_model_dir, data="unused", fsdp=True)
    plain, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    sharded, _ = load_model_and_tokenizer(tiny_model_dir)
    examples, _ = tokenize_rows(ROWS[:6], tokenizer, max_len=64)
    window = [collate(examples[start:start + 2], pad_token_id(tokenizer)) for start in (0, 2, 4)]
    label_tokens = sum(label_token_count(batch["labels"]) for batch in window)
    _, optimizer = prepare_for_training(plain, dataclasses.replace(config, fsdp=False), CPU)
    train_step(plain, optimizer, window, label_tokens, max_grad_norm=1.0, device=CPU)

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        setup = setup_model(sharded, config, CPU, TorchrunWorld(), log=lambda line: None)
        reductions = []
        for param in trainable_parameters(sharded).values():
            param.register_post_accumulate_grad_hook(lambda param: reductions.append(param))
        train_step(sharded, setup.optimizer, window, label_tokens, max_grad_norm=1.0, device=CPU, world=setup.world)
        assert len(reductions) == len(trainable_parameters(sharded)) > 0  # each once, not once per micro-batch
        got = {name: param.full_tensor() for name, param in trainable_parameters(sharded).items()}
    finally:
        dist.destroy_process_group()
    for name, param in trainable_parameters(plain).items():
        torch.testing.assert_close(got[name], param.detach(), rtol=1e-5, atol=1e-6)
