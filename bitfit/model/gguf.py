"""A model from a GGUF file (llama.cpp's format), dequantized into an ordinary transformers model.

GGUF stores a model's weights (often quantized to a few bits), its config and its tokenizer,
chat template included, in one file. transformers reads all three; this module puts them
together without `from_pretrained(gguf_file=...)`, which needs the accelerate package: the
config and tokenizer come from the file's metadata, the model is built from the config, and
the weights, dequantized to the dtype asked for, are copied in. The result is the same
`LlamaForCausalLM` (or other class) a Hugging Face folder would give, so everything else in
bitfit (freezing, --add-biases, deltas, export) works on it unchanged.
"""

import contextlib
import struct
from pathlib import Path

import torch

from bitfit.errors import InputError, library_logs_silenced
from bitfit.model.known import missing_model_hint

GGUF_SUFFIX = ".gguf"


def is_gguf_source(name: str) -> bool:
    """Whether --model names a GGUF file, or a folder of GGUF files that is no Hugging Face folder."""
    path = Path(name).expanduser()
    if name.lower().endswith(GGUF_SUFFIX):
        return True
    return path.is_dir() and not (path / "config.json").exists() and any(_gguf_files(path))


def find_gguf_file(name: str) -> Path:
    """The file a GGUF --model names: the path itself, or the one .gguf file in a folder."""
    path = Path(name).expanduser()
    if path.is_dir():
        files = _gguf_files(path)
        if len(files) != 1:
            listing = ", ".join(file.name for file in files) or "none"
            raise InputError(f"model folder {name} must hold exactly one {GGUF_SUFFIX} file (or a "
                             f"config.json); it holds {listing}: name the file itself")
        return files[0]
    if not path.is_file():
        raise InputError(f"GGUF file not found: {name}{missing_model_hint(name)}")
    return path


def _gguf_files(folder: Path) -> list[Path]:
    return sorted(file for file in folder.iterdir() if file.suffix.lower() == GGUF_SUFFIX and file.is_file())


def gguf_config(name: str):
    """The model's transformers config, read from the file's metadata (no weights are read)."""
    import transformers

    file = find_gguf_file(name)
    with _gguf_errors(file):
        return transformers.AutoConfig.from_pretrained(file.parent, gguf_file=file.name)


def load_gguf_model_and_tokenizer(name: str, dtype: torch.dtype = torch.float32):
    """Return (model, tokenizer) from a GGUF file, its weights dequantized to dtype."""
    import transformers
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    file = find_gguf_file(name)
    config = gguf_config(name)
    with _gguf_errors(file):
        tokenizer = transformers.AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
        # Every weight is about to be overwritten from the file, so skip the random initialisation
        # (seconds on a 135M model); load_weights checks that nothing was left out.
        with no_init_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
        # The reader maps GGUF tensor names (blk.0.attn_q.weight) to the model's own, undoes
        # llama.cpp's reordering of the query and key rows, and dequantizes each tensor.
        tensors = load_gguf_checkpoint(str(file), return_tensors=True, model_to_load=model,
                                       torch_dtype=dtype)["tensors"]
    load_weights(model, tensors, file)
    return model.eval(), tokenizer  # as from_pretrained returns it


def load_weights(model, tensors: dict[str, torch.Tensor], file: Path) -> None:
    """Copy the file's tensors into the model; every parameter must come from the file,
    except an output head tied to the embedding, which shares the embedding's tensor."""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    embedding = model.get_input_embeddings().weight
    tied = {name for name, param in model.named_parameters(remove_duplicate=False) if param is embedding}
    left_out = sorted(set(missing) - tied)
    if left_out or unexpected:
        raise InputError(f"{file}: its tensors do not match a {type(model).__name__} "
                         f"(missing {left_out[:3]}, unexpected {sorted(unexpected)[:3]})")


@contextlib.contextmanager
def _gguf_errors(file: Path):
    """Turn transformers' complaints about a GGUF file into one line that names it."""
    try:
        with library_logs_silenced():
            yield
    except (struct.error, IndexError) as error:  # the header ends before what it promises
        raise InputError(f"could not load GGUF file {file}: it is truncated or corrupt ({error})") from None
    except (OSError, ValueError, KeyError, NotImplementedError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if "cannot reshape array" in first_line:  # a tensor's bytes end before its shape does
            first_line = f"it is truncated or corrupt ({first_line})"
        raise InputError(f"could not load GGUF file {file}: {first_line}") from None
