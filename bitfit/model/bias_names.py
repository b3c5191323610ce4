"""Where each group of biases lives, by the names of the modules that hold it, in the GPT-2, BLOOM, OPT,
GPT-NeoX, Qwen2 and LLaMA families: the table behind --bias-terms and --add-biases."""

BIAS_GROUPS = ("all", "query", "key", "value", "attn-out", "mlp-in", "mlp-out", "norm")
# The modules that hold each group in the GPT-2, BLOOM, OPT, GPT-NeoX, Qwen2 and LLaMA families,
# matched on the end of the module's path: GPT-2 names both attn.c_proj (attn-out) and mlp.c_proj
# (mlp-out), which only their parent tells apart.
GROUP_MODULES = {
    "query": ("q_proj",),
    "key": ("k_proj",),
    "value": ("v_proj",),
    "attn-out": ("attn.c_proj", "self_attention.dense", "self_attn.out_proj", "attention.dense", "o_proj"),
    "mlp-in": ("mlp.c_fc", "dense_h_to_4h", "fc1", "gate_proj", "up_proj"),
    "mlp-out": ("mlp.c_proj", "dense_4h_to_h", "fc2", "down_proj"),
}
# Modules whose one bias holds query, key and value together, and how they are laid out in it.
# GPT-2's c_attn output is split in thirds, [q | k | v]. BLOOM's and GPT-NeoX's query_key_value
# output is viewed as (heads, 3 * head_dim) and split per head: [q_h, k_h, v_h] for each head h.
FUSED_QKV = {"attn.c_attn": "thirds", "query_key_value": "per-head"}
QKV = ("query", "key", "value")


def ends_with(path: str, modules) -> bool:
    return any(f".{path}".endswith(f".{module}") for module in modules)
