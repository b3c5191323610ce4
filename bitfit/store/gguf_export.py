"""A delta as a GGUF file that llama.cpp runs (python -m bitfit.export --format gguf).

No runtime that reads GGUF files (llama.cpp, Ollama, LM Studio) loads a bias-only adapter: llama.cpp's
adapter loader takes LoRA's lora_a/lora_b tensors alone. But its model loader reads optional bias tensors
for the LLaMA architecture (blk.N.attn_q.bias, ... ffn_down.bias), so a delta can travel inside a copy of
its base file: every metadata key and every tensor of the base copied as it is (4-bit blocks byte for
byte, nothing dequantized), and the trained biases added as F32 tensors under llama.cpp's names. Where
the base already has a bias, the file holds the trained one (the base's plus what training changed).

The `gguf` package (llama.cpp's own) reads and writes the file and maps Hugging Face tensor names to
llama.cpp's.
"""

import json

import numpy as np
import torch

from bitfit.errors import InputError
from bitfit.store.files import atomic_write

# The optional bias tensors llama.cpp's loader reads, by architecture (its LLM_ARCH_LLAMA loads bq, bk, bv,
# bo and the three MLP biases); any other trained bias would be left out of the model it runs.
LLAMA_CPP_BIASES = {"llama": ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
# The --bias-terms that train only biases llama.cpp loads, by architecture.
BIAS_TERMS_THAT_EXPORT = {"llama": "query,key,value,attn-out,mlp-in,mlp-out"}
# The metadata key an export adds, so that a later --overwrite replaces an earlier export's file and no other.
EXPORT_KEY = "bitfit.export"
# The projections whose rows llama.cpp stores in its own order (see permute_rows), and the config field that
# gives the number of heads they are permuted by.
PERMUTED = {"attn_q": "num_attention_heads", "attn_k": "num_key_value_heads"}


def gguf_bias_names(base_file, names: list[str]) -> dict[str, str]:
    """name in the model -> name in llama.cpp's file, for the trained biases; a bias llama.cpp would not
    load (or an architecture bitfit has not mapped) is refused in one line, before anything is written."""
    import gguf

    reader = read_gguf(base_file)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    if arch not in LLAMA_CPP_BIASES:
        raise InputError(f"--format gguf: bitfit maps biases only to llama.cpp's {', '.join(LLAMA_CPP_BIASES)} "
                         f"architecture, and {base_file} is {arch}; export --format hf, then convert that folder "
                         f"with llama.cpp's convert_hf_to_gguf.py")
    blocks = reader.get_field(f"{arch}.block_count").contents()
    architecture = {value: key for key, value in gguf.MODEL_ARCH_NAMES.items()}[arch]
    name_map = gguf.get_tensor_name_map(architecture, blocks)
    mapped, refused = {}, []
    for name in names:
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias")) if name.endswith(".bias") else None
        if gguf_name is None or gguf_name.split(".")[-2] not in LLAMA_CPP_BIASES[arch]:
            refused.append(name)
        else:
            mapped[name] = gguf_name
    if refused:
        shown = ", ".join(refused[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
        raise InputError(f"--format gguf: llama.cpp's {arch} loads no bias for {shown}; a delta trained with "
                         f"--bias-terms {BIAS_TERMS_THAT_EXPORT[arch]} exports")
    return mapped


def read_gguf(path):
    """gguf's reader of path; a file it cannot read (truncated, not GGUF) is one line."""
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # struct.error, ValueError: the reader's words for a damaged file vary
        raise InputError(f"could not read GGUF file {path}: it is truncated or corrupt ({error})") from None


def permute_rows(bias: torch.Tensor, heads: int) -> torch.Tensor:
    """A query or key bias in llama.cpp's row order.

    The two implementations of LLaMA's rotary embedding pair a head's dimensions differently: Hugging
    Face rotates the first half of each head against the second, llama.cpp each even dimension against
    the odd one after it. So llama.cpp's converter reorders the rows of q_proj and k_proj, weights and
    biases alike, within each head (and transformers undoes it when it loads a GGUF file, as bitfit's
    delta was trained). A bias must be reordered as its weight was, or it lands on the wrong dimensions.
    """
    return bias.reshape(heads, 2, bias.numel() // heads // 2).transpose(1, 2).reshape(bias.shape)


def write_gguf_with_biases(base_file, out, biases: dict[str, torch.Tensor], config, record: dict | None = None
                           ) -> None:
    """Write out: base_file's metadata and tensors as they are, with the trained biases (name in the model ->
    values) added as F32 tensors, or in place of the base's; config gives the heads of the query and key.
    record, what the export records of itself, goes in one more metadata key (EXPORT_KEY)."""
    import gguf

    names = gguf_bias_names(base_file, list(biases))
    arrays = {}
    for name, bias in biases.items():
        kind = names[name].split(".")[-2]
        values = bias.detach().float().cpu()
        if kind in PERMUTED:
            values = permute_rows(values, getattr(config, PERMUTED[kind]))
        arrays[names[name]] = np.ascontiguousarray(values.numpy(), dtype=np.float32)
    reader = read_gguf(base_file)

    def write(temporary) -> None:
        writer = gguf.GGUFWriter(temporary, reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(),
                                 endianess=reader.endianess)
        for field in reader.fields.values():
            # The writer writes the architecture, and the GGUF.* fields (version, counts) itself.
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            writer.add_key_value(field.name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
        if record is not None:
            writer.add_string(EXPORT_KEY, json.dumps(record))
        tensors = [(tensor.name, arrays.pop(tensor.name, None), tensor) for tensor in reader.tensors]
        tensors += [(name, array, None) for name, array in arrays.items()]  # biases the base does not have
        for name, array, tensor in tensors:
            if array is None:  # as it is: quantized blocks keep their type and bytes
                writer.add_tensor_info(name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                                       tensor.tensor_type)
            else:
                writer.add_tensor_info(name, array.shape, array.dtype, array.nbytes, gguf.GGMLQuantizationType.F32)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, array, tensor in tensors:
            writer.write_tensor_data(tensor.data if array is None else array, tensor_endianess=reader.endianess)
        writer.close()

    atomic_write(out, write)


def written_by_export(path) -> bool:
    """Whether path is a GGUF file that an export wrote (it holds EXPORT_KEY)."""
    import gguf

    try:
        return gguf.GGUFReader(path).get_field(EXPORT_KEY) is not None
    except Exception:  # not a GGUF file at all, or a damaged one: not ours to replace
        return False
