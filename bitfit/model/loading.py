"""Loading a causal LM and its tokenizer: a hub id, a folder, a GGUF file, or the built-in tiny GPT-2."""

from pathlib import Path

import torch
from safetensors import SafetensorError

from bitfit.config import ASSETS, DEFAULT_MODEL
from bitfit.errors import InputError, library_logs_silenced
from bitfit.model.gguf import find_gguf_file, gguf_config, is_gguf_source, load_gguf_model_and_tokenizer
from bitfit.model.known import missing_model_hint

TINY_GPT2_DIR = ASSETS / "tiny-gpt2"
TINY_GPT2_SEED = 0


def load_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) for a hub id, a local folder, a GGUF file, or DEFAULT_MODEL."""
    model, tokenizer = _load(name, dtype)
    # transformers warns once that a text longer than the model's limit "will result in indexing errors":
    # bitfit cuts examples at --max-len (itself capped at that limit) and refuses over-long prompts in a line
    # of its own, so the warning would only mislead. It is marked as already given.
    tokenizer.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True
    return model, tokenizer


def _load(name: str, dtype: torch.dtype):
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


def load_model_shape(name: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) with the model's shape alone, on the meta device: its config is read, no
    weight is (bitfit.training.estimate). A folder may hold only a config.json; tokenizer is None
    where it holds none."""
    import transformers

    config, tokenizer_source = _config_and_tokenizer_source(name)
    tokenizer = None
    try:
        with library_logs_silenced():
            tokenizer = transformers.AutoTokenizer.from_pretrained(**tokenizer_source)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # a config alone: enough for the shape
    try:
        with torch.device("meta"), library_logs_silenced():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, KeyError, TypeError, RuntimeError) as error:
        raise InputError(f"cannot build model {name!r} from its config: {_first_line(error)}") from None
    return model, tokenizer


def _config_and_tokenizer_source(name: str):
    import transformers

    if name == DEFAULT_MODEL:
        name = str(TINY_GPT2_DIR)
    if is_gguf_source(name):
        file = find_gguf_file(name)
        return gguf_config(name), {"pretrained_model_name_or_path": file.parent, "gguf_file": file.name}
    _check_model_source(name)
    if Path(name).expanduser().is_dir() and not (Path(name).expanduser() / "config.json").is_file():
        raise InputError(f"model folder {name} holds no config.json: the estimate needs the model's config")
    try:
        with library_logs_silenced():
            config = transformers.AutoConfig.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        raise InputError(f"could not load the config of model {name!r}: {_first_line(error)} (a folder holding "
                         f"only the model's config.json is enough)") from None
    return config, {"pretrained_model_name_or_path": name}
