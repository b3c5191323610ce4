"""Loading a causal LM and its tokenizer: from the hub, a folder, a GGUF file, or the built-in tiny GPT-2."""

from pathlib import Path

import torch
from safetensors import SafetensorError

from bitfit.config import ASSETS, DEFAULT_MODEL
from bitfit.errors import InputError, library_logs_silenced
from bitfit.fetch import missing_model_hint
from bitfit.gguf_file import gguf_config, is_gguf_source, load_gguf_model_and_tokenizer

TINY_GPT2_DIR = ASSETS / "tiny-gpt2"
TINY_GPT2_SEED = 0
AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# Where configs keep the attention-probability dropout: GPT-2; BLOOM, OPT, GPT-NeoX, LLaMA, Qwen2.
ATTENTION_DROPOUT_NAMES = ("attn_pdrop", "attention_dropout")


def weights_dtype(config) -> torch.dtype:
    """The dtype the model's weights are loaded in, for a run's mode and --dtype.

    BitFit never updates its weights, so with bf16/fp16 they are stored in that half
    precision: half the memory, and the autocast forward uses them as they are. The biases
    are kept in fp32 (see bitfit.run.set_precision_and_kernels), since an update of 1e-5 to a bias
    of 0.5 would vanish in bf16, whose 8-bit mantissa resolves only ~0.4% steps. Full
    fine-tuning updates every weight, so it keeps them all in fp32 and only computes in half
    precision under autocast (classic mixed precision).
    """
    if config.mode == "bitfit" and AUTOCAST_DTYPES[config.dtype] is not None:
        return AUTOCAST_DTYPES[config.dtype]
    return torch.float32


def keep_norms_in_fp32(model: torch.nn.Module) -> None:
    """Give normalisation layers fp32 parameters and fp32 inputs in a half-precision model.

    Norms divide by a variance computed over thousands of values, which half precision does
    badly; their parameters are a few thousand numbers, so fp32 costs nothing. (CUDA autocast
    upcasts them itself; CPU autocast does not, and would meet bf16 weights beside fp32 biases.)
    """
    for module in model.modules():
        if "norm" in type(module).__name__.lower():
            module.float()
            module.register_forward_pre_hook(_floating_inputs_to_fp32)


def _floating_inputs_to_fp32(module, args):
    return tuple(arg.float() if torch.is_tensor(arg) and arg.is_floating_point() else arg for arg in args)


def fuse_tanh_gelu(model: torch.nn.Module) -> int:
    """Swap Python-written tanh-GELU modules for PyTorch's fused kernel of the same formula.

    GPT-2's "gelu_new" and BLOOM's gelu spell 0.5x(1 + tanh(0.798(x + 0.0447x^3))) out as eight
    or so tensor operations, each of which reads and writes the whole MLP activation (4x the
    hidden size), in the forward pass and again in the backward. F.gelu(approximate="tanh")
    does it in one pass; the outputs agree to float rounding. In BitFit, where no weight
    gradient is computed, these element-wise passes are a large share of each step: on the
    built-in model on CPU the swap makes a step about 8% faster. Returns how many were swapped.
    """
    from transformers.activations import FastGELUActivation, NewGELUActivation
    from transformers.models.bloom.modeling_bloom import BloomGelu

    unfused = (NewGELUActivation, FastGELUActivation, BloomGelu)
    swapped = 0
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, unfused):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))
                swapped += 1
    return swapped


def prefer_eager_attention_on_cpu(model: torch.nn.Module, device: torch.device) -> bool:
    """Train with the eager attention where PyTorch's fused one would fall back to a slower path.

    On CPU, scaled_dot_product_attention has no fused kernel with dropout: when attention
    dropout is on, it runs an unfused "math" path that does what the eager implementation does
    plus extra passes (a softmax that guards fully masked rows, q and k scaled separately).
    Training the built-in model on CPU is then about 6% faster with eager attention. On GPUs,
    and without dropout, the fused kernels are faster and stay. Returns whether it switched.
    """
    config = model.config
    dropout = max(getattr(config, name, 0.0) or 0.0 for name in ATTENTION_DROPOUT_NAMES)
    if device.type != "cpu" or dropout == 0 or config._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation("eager")
    return True


def load_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) for a hub id, a local folder, a GGUF file, or DEFAULT_MODEL."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if name == DEFAULT_MODEL:
        return _load_builtin_tiny_gpt2(dtype)
    if is_gguf_source(name):
        return load_gguf_model_and_tokenizer(name, dtype)
    _check_model_source(name)
    try:
        with library_logs_silenced():
            tokenizer = transformers.AutoTokenizer.from_pretrained(name)
            # Ask for the dtype explicitly: many hub checkpoints are stored in fp16/bf16.
            model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # SafetensorError: a truncated file
        raise InputError(f"could not load model {name!r}: {_first_line(error)}") from None
    return model, tokenizer


def position_limit(name: str) -> int | None:
    """The most tokens the model reads at once, from its config, before any weight loads.

    None where the config names no limit (BLOOM's ALiBi attention has no position table).
    """
    import transformers

    if name == DEFAULT_MODEL:
        name = str(TINY_GPT2_DIR)
    elif is_gguf_source(name):
        return getattr(gguf_config(name), "max_position_embeddings", None)
    else:
        _check_model_source(name)
    try:
        with library_logs_silenced():
            config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"could not load model {name!r}: {_first_line(error)}") from None
    # GPT-2 calls it n_positions; its config maps max_position_embeddings onto that.
    return getattr(config, "max_position_embeddings", None)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _check_model_source(name: str) -> None:
    path = Path(name).expanduser()
    if not path.exists() and missing_model_hint(name):
        raise InputError(f"model folder not found: {name}{missing_model_hint(name)}")
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path and not path.is_dir():
        raise InputError(f"model folder not found: {name}")


def _load_builtin_tiny_gpt2(dtype: torch.dtype):
    """A 4-layer GPT-2 whose config and tokenizer ship in bitfit/assets.

    Its weights are random, drawn from a fixed seed, so every process builds the same model:
    that is what lets a bias delta trained in one run be applied to the base in another.
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(TINY_GPT2_DIR)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_GPT2_DIR)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_GPT2_SEED)
        # Drawn in fp32 then cast, so a bf16 load holds the same weights as an fp32 one, rounded.
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.to(dtype), tokenizer


def pad_token_id(tokenizer) -> int:
    """The id used to pad input_ids; GPT-2 has no pad token, so fall back to eos."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(choice)


# ------------------------------------------------------- building tiny models (tests, assets)


def train_tokenizer(texts, vocab_size: int, eos_token: str = "<|endoftext|>"):
    """Train a small byte-level BPE tokenizer in the style of GPT-2 (eos, no pad token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[eos_token],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos_token,
                                   bos_token=eos_token, unk_token=eos_token)


def tiny_gpt2_config(tokenizer, **overrides):
    from transformers import GPT2Config

    settings = dict(vocab_size=len(tokenizer), n_positions=512, n_embd=256, n_layer=4, n_head=4,
                    bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    settings.update(overrides)
    return GPT2Config(**settings)
