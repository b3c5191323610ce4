"""--bias-terms: which biases each group names in each model family, slices of fused q,k,v biases
that train while the rest stays bit-identical, the count of trained numbers, and the errors."""

import signal

import pytest
import torch
from conftest import ROWS, prepare_for_training
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    Qwen2Config,
)

import train
from bitfit.config import TrainConfig
from bitfit.core.loop import train_loop
from bitfit.core.trainable import count_parameters, is_bias
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError, Interrupted
from bitfit.model.bias_terms import choose_biases, describe_bias_terms, partly_trained, select_trainable
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id
from bitfit.store.checkpoint import load_training_state
from bitfit.store.metrics import MetricsLog
from bitfit.training.run import run

CPU = torch.device("cpu")
HIDDEN, HEADS, LAYERS = 12, 3, 2  # 3 heads of 4: per-head interleaving differs from thirds
HEAD_DIM = HIDDEN // HEADS
GROUPS = ("query", "key", "value", "attn-out", "mlp-in", "mlp-out", "norm")


def tiny(family: str):
    size = dict(vocab_size=64)
    configs = {
        "gpt2": lambda: GPT2Config(n_embd=HIDDEN, n_head=HEADS, n_layer=LAYERS, n_positions=32, **size),
        "bloom": lambda: BloomConfig(hidden_size=HIDDEN, n_head=HEADS, n_layer=LAYERS, **size),
        "opt": lambda: OPTConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                                 ffn_dim=4 * HIDDEN, word_embed_proj_dim=HIDDEN, max_position_embeddings=32,
                                 **size),
        "neox": lambda: GPTNeoXConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                                      intermediate_size=4 * HIDDEN, **size),
        "qwen2": lambda: Qwen2Config(hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                                     num_hidden_layers=LAYERS, intermediate_size=4 * HIDDEN, **size),
        "llama": lambda: LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS, num_hidden_layers=LAYERS,
                                     intermediate_size=4 * HIDDEN, **size),
        "llama-biased": lambda: LlamaConfig(hidden_size=HIDDEN, num_attention_heads=HEADS,
                                            num_hidden_layers=LAYERS, intermediate_size=4 * HIDDEN,
                                            attention_bias=True, mlp_bias=True, **size),
    }
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(configs[family]())
    with torch.no_grad():  # random init leaves biases at zero, where weight decay could not move them
        for name, param in model.named_parameters():
            if is_bias(name):
                param.normal_(0, 0.02)
    return model


def thirds(which):
    return list(range(which * HIDDEN, (which + 1) * HIDDEN))


def per_head(which):
    """Entry h * 3 * head_dim + which * head_dim + t of the fused bias is head h's q (0), k (1) or v (2)."""
    return [h * 3 * HEAD_DIM + which * HEAD_DIM + t for h in range(HEADS) for t in range(HEAD_DIM)]


def layers(prefix, *modules, slice_=None):
    return {f"{prefix}.{layer}.{module}.bias": slice_ for layer in range(LAYERS) for module in modules}


# group -> {bias name: indices of the entries that train, None for all of them}
EXPECTED = {
    "gpt2": {
        "query": layers("transformer.h", "attn.c_attn", slice_=thirds(0)),
        "key": layers("transformer.h", "attn.c_attn", slice_=thirds(1)),
        "value": layers("transformer.h", "attn.c_attn", slice_=thirds(2)),
        "attn-out": layers("transformer.h", "attn.c_proj"),
        "mlp-in": layers("transformer.h", "mlp.c_fc"),
        "mlp-out": layers("transformer.h", "mlp.c_proj"),
        "norm": {**layers("transformer.h", "ln_1", "ln_2"), "transformer.ln_f.bias": None},
    },
    "bloom": {
        "query": layers("transformer.h", "self_attention.query_key_value", slice_=per_head(0)),
        "key": layers("transformer.h", "self_attention.query_key_value", slice_=per_head(1)),
        "value": layers("transformer.h", "self_attention.query_key_value", slice_=per_head(2)),
        "attn-out": layers("transformer.h", "self_attention.dense"),
        "mlp-in": layers("transformer.h", "mlp.dense_h_to_4h"),
        "mlp-out": layers("transformer.h", "mlp.dense_4h_to_h"),
        "norm": {"transformer.word_embeddings_layernorm.bias": None,
                 **layers("transformer.h", "input_layernorm", "post_attention_layernorm"),
                 "transformer.ln_f.bias": None},
    },
    "neox": {
        "query": layers("gpt_neox.layers", "attention.query_key_value", slice_=per_head(0)),
        "key": layers("gpt_neox.layers", "attention.query_key_value", slice_=per_head(1)),
        "value": layers("gpt_neox.layers", "attention.query_key_value", slice_=per_head(2)),
        "attn-out": layers("gpt_neox.layers", "attention.dense"),
        "mlp-in": layers("gpt_neox.layers", "mlp.dense_h_to_4h"),
        "mlp-out": layers("gpt_neox.layers", "mlp.dense_4h_to_h"),
        "norm": {**layers("gpt_neox.layers", "input_layernorm", "post_attention_layernorm"),
                 "gpt_neox.final_layer_norm.bias": None},
    },
    "opt": {
        "query": layers("model.decoder.layers", "self_attn.q_proj"),
        "key": layers("model.decoder.layers", "self_attn.k_proj"),
        "value": layers("model.decoder.layers", "self_attn.v_proj"),
        "attn-out": layers("model.decoder.layers", "self_attn.out_proj"),
        "mlp-in": layers("model.decoder.layers", "fc1"),
        "mlp-out": layers("model.decoder.layers", "fc2"),
        "norm": {"model.decoder.final_layer_norm.bias": None,
                 **layers("model.decoder.layers", "self_attn_layer_norm", "final_layer_norm")},
    },
    "qwen2": {
        "query": layers("model.layers", "self_attn.q_proj"),
        "key": layers("model.layers", "self_attn.k_proj"),
        "value": layers("model.layers", "self_attn.v_proj"),
    },
    "llama-biased": {
        "query": layers("model.layers", "self_attn.q_proj"),
        "key": layers("model.layers", "self_attn.k_proj"),
        "value": layers("model.layers", "self_attn.v_proj"),
        "attn-out": layers("model.layers", "self_attn.o_proj"),
        "mlp-in": layers("model.layers", "mlp.gate_proj", "mlp.up_proj"),
        "mlp-out": layers("model.layers", "mlp.down_proj"),
    },
}


def chosen_indices(model, term):
    """{name: the indices that train, or None for the whole tensor} of one term."""
    return {name: None if mask is None else mask.nonzero().flatten().tolist()
            for name, (mask, _) in choose_biases(model, term)[term].items()}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_group_names_its_biases_and_slices(family):
    model = tiny(family)
    for group in GROUPS:
        if group in EXPECTED[family]:
            assert chosen_indices(model, group) == EXPECTED[family][group], group
        else:
            with pytest.raises(InputError, match=f"has no {group} biases"):
                choose_biases(model, group)


def test_bloom_query_slice_is_what_bloom_attention_reads_as_queries():
    """Checked against the model's own code: BLOOM's _reshape of a fused output numbered 0..3H-1."""
    model = tiny("bloom")
    numbered = torch.arange(3 * HIDDEN).view(1, 1, -1)
    query, key, value = model.transformer.h[0].self_attention._reshape(numbered)
    for term, layer in [("query", query), ("key", key), ("value", value)]:
        name = "transformer.h.0.self_attention.query_key_value.bias"
        assert chosen_indices(model, term)[name] == sorted(layer.flatten().tolist())


def test_query_and_mlp_in_train_exactly_those_and_count_their_numbers(tiny_model_dir, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_model_dir)  # GPT-2: 2 layers, n_embd 32
    cfg = TrainConfig(model="unused", data="unused", output_dir=str(tmp_path), bias_terms="query,mlp-in")
    trained, optimizer = prepare_for_training(model, cfg, CPU)
    expected = [f"transformer.h.{layer}.{module}.bias" for layer in range(2) for module in ("attn.c_attn", "mlp.c_fc")]
    assert trained == expected
    assert [name for name, p in model.named_parameters() if p.requires_grad] == expected
    assert sum(len(group["params"]) for group in optimizer.param_groups) == 4
    masks = partly_trained(model, cfg.bias_terms)
    assert list(masks) == expected[0::2]
    trainable, total = count_parameters(model, masks)
    assert trainable == 2 * (32 + 4 * 32)  # the query third of c_attn, and all of c_fc, per layer
    assert total == count_parameters(model)[1]
    assert describe_bias_terms(model, cfg.bias_terms).splitlines() == [
        "trains query: transformer.h.*.attn.c_attn.bias[0:32] (2 tensors, 64 numbers)",
        "trains mlp-in: transformer.h.*.mlp.c_fc.bias (2 tensors, 256 numbers)"]


def train_a_few_steps(model, examples, pad_id, tmp_path, bias_terms):
    # Weight decay on: it would shrink the masked-out slice if that were in a decayed group.
    cfg = TrainConfig(model="unused", data="unused", output_dir=str(tmp_path), bias_terms=bias_terms,
                      max_steps=3, batch_size=2, grad_accum=1, warmup_ratio=0.0, weight_decay=0.1)
    _, optimizer = prepare_for_training(model, cfg, CPU)
    train_loop(model, optimizer, examples, cfg, pad_id=pad_id, device=CPU)


def test_untouched_slice_of_gpt2_c_attn_stays_bit_identical(tiny_model_dir, tmp_path):
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples, _ = tokenize_rows(ROWS, tokenizer, max_len=64)
    train_a_few_steps(model, examples, pad_token_id(tokenizer), tmp_path, "query,mlp-in")
    for name, param in model.named_parameters():
        if name.endswith("attn.c_attn.bias"):
            assert torch.equal(param[32:], before[name][32:]), name  # key and value
            assert (param[:32] != before[name][:32]).all(), name  # every query entry moved
        elif name.endswith("mlp.c_fc.bias"):
            assert (param != before[name]).all(), name
        else:
            assert torch.equal(param, before[name]), name


def test_untouched_slices_of_bloom_query_key_value_stay_bit_identical(tmp_path):
    model = tiny("bloom")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)
    examples = [{"input_ids": ids, "labels": [-100, -100] + ids[2:]}
                for ids in torch.randint(1, 64, (8, 10), generator=generator).tolist()]
    train_a_few_steps(model, examples, 0, tmp_path, "value")
    value = torch.tensor(per_head(2))
    others = torch.tensor(sorted(set(range(3 * HIDDEN)) - set(per_head(2))))
    for name, param in model.named_parameters():
        if name.endswith("query_key_value.bias"):
            assert torch.equal(param[others], before[name][others]), name
            assert (param[value] != before[name][value]).all(), name
        else:
            assert torch.equal(param, before[name]), name


def test_regex_term_selects_whole_bias_tensors():
    model = tiny("gpt2")
    assert chosen_indices(model, r"h\.1\..*c_attn") == {"transformer.h.1.attn.c_attn.bias": None}
    assert chosen_indices(model, "ln_f") == {"transformer.ln_f.bias": None}
    assert select_trainable(model, "bitfit", r"ln_f,h\.0\.mlp") == [
        "transformer.h.0.mlp.c_fc.bias", "transformer.h.0.mlp.c_proj.bias", "transformer.ln_f.bias"]


def test_query_key_and_value_together_train_the_fused_bias_whole():
    assert partly_trained(tiny("gpt2"), "query,key,value") == {}
    assert partly_trained(tiny("bloom"), "value,query,key") == {}


@pytest.mark.parametrize("family, terms, message", [
    ("gpt2", "querry", "'querry' is neither a group nor a regular expression that matches a bias of this "
                       "GPT2LMHeadModel; the groups it has: all, query, key, value, attn-out, mlp-in, "
                       "mlp-out, norm"),
    ("gpt2", "query,h[", "'h[' is neither a group nor a valid regular expression"),
    ("gpt2", "wte", "'wte' is neither a group nor a regular expression that matches a bias"),
    ("qwen2", "query,norm", "--bias-terms norm: this Qwen2ForCausalLM has no norm biases; the groups it has: "
                            "all, query, key, value"),
    ("llama", "query", "this LlamaForCausalLM has no query biases; it has no bias terms at all"),
    ("llama", "all", "this LlamaForCausalLM has no biases; it has no bias terms at all"),
])
def test_a_term_that_chooses_nothing_names_what_the_model_has(family, terms, message):
    with pytest.raises(InputError) as error:
        select_trainable(tiny(family), "bitfit", terms)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_default_all_trains_every_bias_whole(tiny_model_dir, tmp_path):
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    cfg = TrainConfig(model="unused", data="unused", output_dir=str(tmp_path))
    assert cfg.bias_terms == "all"
    trained, optimizer = prepare_for_training(model, cfg, CPU)
    biases = [name for name, _ in model.named_parameters() if is_bias(name)]
    assert trained == biases == select_trainable(model, "bitfit")
    assert [p for group in optimizer.param_groups for p in group["params"]] == [
        p for name, p in model.named_parameters() if is_bias(name)]
    assert len(optimizer.param_groups) == 1 and partly_trained(model, "all") == {}
    assert count_parameters(model, {}) == count_parameters(model)


@pytest.mark.parametrize("overrides, message", [
    ({"bias_terms": "query,,mlp-in"}, "--bias-terms must be a comma list"),
    ({"bias_terms": " "}, "--bias-terms must be a comma list"),
    ({"mode": "full", "bias_terms": "query"}, "--bias-terms query chooses biases for --mode bitfit"),
])
def test_config_rejects_empty_terms_and_terms_in_full_mode(overrides, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**overrides)


def test_the_flag_reaches_the_config():
    config = train.parse_args(["--bias-terms", "query,mlp-in"])[0]
    assert config.bias_terms == "query,mlp-in"
    assert train.parse_args([])[0].bias_terms == "all"


def settings(tiny_model_dir, alpaca_file, output_dir, **overrides):
    return TrainConfig(**{"model": tiny_model_dir, "data": alpaca_file, "output_dir": str(output_dir),
                          "batch_size": 2, "grad_accum": 2, "max_steps": 4, "log_every": 1,
                          "bias_terms": "query,mlp-in", "weight_decay": 0.1, **overrides})


def test_run_logs_counts_and_saves_whole_tensors_with_the_base_slice(tiny_model_dir, alpaca_file, tmp_path):
    lines = []
    summary = run(settings(tiny_model_dir, alpaca_file, tmp_path / "run", max_steps=2), log=lines.append)
    assert "trains query: transformer.h.*.attn.c_attn.bias[0:32] (2 tensors, 64 numbers)" in "\n".join(lines)
    assert summary["trainable_params"] == 320
    base, _ = load_model_and_tokenizer(tiny_model_dir)
    delta = load_file(tmp_path / "run" / "bias.safetensors")
    assert sorted(delta) == sorted(f"transformer.h.{layer}.{module}.bias" for layer in range(2)
                                   for module in ("attn.c_attn", "mlp.c_fc"))
    for layer in range(2):
        base_bias = base.transformer.h[layer].attn.c_attn.bias
        assert torch.equal(delta[f"transformer.h.{layer}.attn.c_attn.bias"][32:], base_bias[32:])


def test_resume_with_a_sliced_bias_matches_a_straight_run(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(settings(tiny_model_dir, alpaca_file, straight), log=lambda message: None)
    write = MetricsLog.write

    def ctrl_c_after_step_two(self, record):
        write(self, record)
        if record["step"] == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(MetricsLog, "write", ctrl_c_after_step_two)
    with pytest.raises(Interrupted):
        run(settings(tiny_model_dir, alpaca_file, stopped), log=lambda message: None)
    monkeypatch.setattr(MetricsLog, "write", write)
    run(settings(tiny_model_dir, alpaca_file, stopped), load_training_state(str(stopped)), log=lambda m: None)
    expected, resumed = load_file(straight / "bias.safetensors"), load_file(stopped / "bias.safetensors")
    assert sorted(resumed) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-5, atol=1e-6)
        if name.endswith("c_attn.bias"):
            assert torch.equal(resumed[name][32:], tensor[32:])
