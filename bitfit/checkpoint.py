"""Files a run leaves behind: bias deltas, model folders and JSON, each written atomically.

Every write goes to a temporary name in the destination folder and is then renamed over the
target (a rename within one filesystem is atomic), so a crash leaves the old file or the new
one, never half of one. Trained tensors are checked to be finite before they are written, and
a write that fails for lack of space or permission raises OSError, whichever library wrote it.
"""

import hashlib
import io
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from bitfit.bias import add_zero_bias, is_added_bias, remove_added_bias
from bitfit.config import TEMPLATES
from bitfit.errors import InputError

BIAS_FILE = "bias.safetensors"
# /2 added the tensor listing and the base fingerprint; /1 files still load, unchecked by fingerprint.
DELTA_FORMAT = "bitfit-bias-delta/2"
FINGERPRINT_HEAD = 4  # values sampled from the start of each frozen tensor, plus its last


def atomic_write(path: Path, write) -> None:
    """Call write(temporary_path), then move the result onto path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temporary)
        os.replace(temporary, path)
    except OSError as error:
        error.filename = error.filename or str(path)  # a failed write() names no file; say which
        raise
    finally:
        if temporary.exists():
            temporary.unlink()


def save_torch(obj, path: Path) -> None:
    """torch.save, atomically. torch reports a failed write (a full disk) as a RuntimeError that
    hides the cause, so it writes through a file object that keeps the OSError, raised instead."""

    class KeepError(io.RawIOBase):
        def __init__(self, file):
            self.file, self.error = file, None

        def writable(self):
            return True

        def write(self, data):
            try:
                return self.file.write(data)
            except OSError as error:
                self.error = error
                raise

    def write(temporary):
        with open(temporary, "wb") as file:
            sink = KeepError(file)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None

    atomic_write(path, write)


def first_non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an inf, if any."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """A diverged run must not leave a file that looks like a result: refuse before writing."""
    name = first_non_finite(tensors)
    if name is not None:
        raise InputError(f"{what}: {name} holds NaN or inf values; nothing was written (try a lower --lr)")


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def save_bias_delta(path: Path, model: torch.nn.Module, names: list[str], base_model: str,
                    added_biases: list[str] | None = None, quantized_base: str | None = None,
                    template: str = "seed", chat_template_hash: str | None = None) -> None:
    """Save the named trained tensors, under their state-dict names, with what they must be paired with.

    The metadata (safetensors allows only str -> str) records the base's id or path, the model
    class, each tensor's shape and dtype, and a fingerprint of the frozen weights, so that
    applying the delta to the wrong base is refused rather than silently producing nonsense.
    added_biases lists the tensors the base does not have (--add-biases); by default, those
    of names that bitfit.bias.add_zero_bias marked. quantized_base ("nf4") says the base was held
    in 4 bits while the delta trained; the fingerprint is the unquantized base's all the same.
    template says how the training prompts were written ("seed" or "chat", bitfit.chat), and
    chat_template_hash which chat template: generate.py prompts the tuned model the same way.
    """
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to("cpu", copy=True) for name in names}
    write_bias_delta(path, tensors, bias_delta_metadata(model, names, base_model, added_biases, quantized_base,
                                                        template, chat_template_hash))


def bias_delta_metadata(model: torch.nn.Module, names: list[str], base_model: str,
                        added_biases: list[str] | None = None, quantized_base: str | None = None,
                        template: str = "seed", chat_template_hash: str | None = None) -> dict[str, str]:
    """What a delta of the named tensors records about its base and its prompts (see save_bias_delta)."""
    if added_biases is None:
        params = dict(model.named_parameters())
        added_biases = [name for name in names if is_added_bias(params[name])]
    metadata = {"format": DELTA_FORMAT, "base_model": base_model, "model_class": type(model).__name__,
                "base_fingerprint": base_fingerprint(model, names), "added_biases": json.dumps(added_biases)}
    if quantized_base:
        metadata["quantized_base"] = quantized_base
    metadata["template"] = template
    if chat_template_hash:
        metadata["chat_template_hash"] = chat_template_hash
    return metadata


def write_bias_delta(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the tensors (on the CPU) with metadata from bias_delta_metadata, and a listing of them."""
    tensors = {name: tensor.contiguous() for name, tensor in tensors.items()}
    refuse_non_finite(tensors, "the trained biases")
    listing = {name: {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
               for name, tensor in tensors.items()}
    metadata = {**metadata, "tensors": json.dumps(listing)}
    # Serialised in memory (a few MB of biases) and written by Python, so that a full disk raises
    # OSError, and the file gets the user's umask like every other file of the run.
    atomic_write(path, lambda tmp: tmp.write_bytes(safetensors_bytes(tensors, metadata=metadata)))


def base_fingerprint(model: torch.nn.Module, delta_names) -> str:
    """A short hash that tells one base model from another: names, shapes and a few values.

    Only the frozen parameters (those not in the delta) count, since training changes the rest;
    biases added by --add-biases are not the base's, and never count.
    Hashing whole tensors would read every weight of a 1B model; the first few values and the
    last of each tensor tell one checkpoint from another (fine-tuning moves nearly every value,
    though a single edited weight would go unseen), and they reach the CPU in one transfer.
    They are rounded to bfloat16 first, so the same base loaded in fp32 or bf16 matches.
    """
    delta_names = set(delta_names)
    frozen = sorted(((name, param) for name, param in model.named_parameters()
                     if name not in delta_names and not is_added_bias(param)), key=lambda item: item[0])
    modules = dict(model.named_modules())
    shapes, samples = [], []
    for name, param in frozen:
        owner, _, leaf = name.rpartition(".")
        # A weight held in 4 bits (bitfit.quantize) no longer has the base's values; its layer kept
        # the sample of the weight it replaced, so the 4-bit base and the plain one match.
        recorded = getattr(modules[owner], "unquantized_sample", None) if leaf == "weight" else None
        shape, values = recorded or fingerprint_sample(param)
        shapes.append([name, shape])
        samples.append(values.to(param.device))
    values = torch.cat(samples).cpu() if samples else torch.empty(0, dtype=torch.bfloat16)
    digest = hashlib.sha256(json.dumps(shapes).encode())
    digest.update(values.view(torch.int16).numpy().tobytes())  # numpy has no bfloat16: hash the bits
    return digest.hexdigest()[:16]


def fingerprint_sample(tensor: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """What the fingerprint reads from one frozen tensor: its shape, and its first few values and its
    last, rounded to bfloat16."""
    flat = tensor.detach().reshape(-1)
    return list(tensor.shape), torch.cat([flat[:FINGERPRINT_HEAD], flat[-1:]]).to(torch.bfloat16)


def find_bias_file(path: str) -> Path:
    """Accept a run folder (holding bias.safetensors) or the file itself."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / BIAS_FILE
    if not candidate.is_file():
        raise InputError(f"bias delta not found: {candidate}")
    return candidate


def load_bias_delta(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors, metadata) of a delta file."""
    file = find_bias_file(path)
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as error:
        # A truncated file fails here too: its header promises more bytes than the file holds.
        raise InputError(f"{file}: not a readable safetensors file, or a truncated one ({error})") from None
    try:
        delta_added_biases(metadata)
        delta_template(metadata)
    except InputError as error:
        raise InputError(f"{file}: {error}") from None
    return tensors, metadata


def recorded_base(metadatas: list[dict[str, str]]) -> str | None:
    """The base model the deltas were trained on; refuse deltas that name different ones."""
    bases = sorted({metadata["base_model"] for metadata in metadatas if metadata.get("base_model")})
    if len(bases) > 1:
        raise InputError(f"the bias deltas were trained on different bases ({', '.join(bases)}); "
                         f"choose one with --model")
    return bases[0] if bases else None


def check_bias_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None, force: bool = False) -> None:
    """Refuse a delta that does not fit the model: class, tensor names, shapes, base fingerprint.

    force skips only the fingerprint: a delta whose tensors do not fit can never be applied.
    Files written before fingerprints were recorded are checked on names and shapes alone.
    """
    metadata = metadata or {}
    name = first_non_finite(tensors)
    if name is not None:
        raise InputError(f"bias delta tensor {name!r} holds NaN or inf values: the run that wrote it diverged")
    recorded_class = metadata.get("model_class")
    if recorded_class and recorded_class != type(model).__name__:
        raise InputError(f"bias delta was trained on a {recorded_class} "
                         f"({metadata.get('base_model', 'base not recorded')}), but the model is a "
                         f"{type(model).__name__}")
    params = dict(model.named_parameters())
    added = set(delta_added_biases(metadata))
    for name, tensor in tensors.items():
        if name not in params and name in added:
            layer = _bias_less_linear(model, name)
            if layer is None or (layer.out_features,) != tuple(tensor.shape):
                raise InputError(f"bias delta adds {name!r}, but the model has no bias-less Linear layer "
                                 f"of {tensor.shape[0]} outputs there")
            continue
        if name not in params:
            raise InputError(f"bias delta holds {name!r}, which the model does not have")
        if params[name].shape != tensor.shape:
            raise InputError(f"bias delta tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model's has {tuple(params[name].shape)}")
    recorded = metadata.get("base_fingerprint")
    if recorded and not force:
        actual = base_fingerprint(model, tensors)
        if actual != recorded:
            raise InputError(f"bias delta does not fit this base: recorded base "
                             f"{metadata.get('base_model', '?')!r} has fingerprint {recorded}, this base "
                             f"{actual} (its weights differ); load the recorded base, or --force if you "
                             f"know they match")


def apply_bias_delta(model: torch.nn.Module, tensors: dict[str, torch.Tensor],
                     metadata: dict[str, str] | None = None, force: bool = False) -> dict[str, torch.Tensor]:
    """Copy each delta tensor into the model parameter of the same name, once it is checked.

    A bias the delta says was added (--add-biases) is first created, zero, on its Linear layer.
    Returns the values it overwrote, None for a created bias: remove_bias_delta(model, previous)
    puts them back (and takes created biases away), bit for bit, so one base in memory can serve
    several deltas in turn.
    """
    check_bias_delta(model, tensors, metadata, force)
    previous = {}
    for name in tensors:
        if name not in dict(model.named_parameters()):
            add_zero_bias(_bias_less_linear(model, name))
            previous[name] = None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            if name not in previous:
                previous[name] = params[name].detach().clone()
            params[name].copy_(tensor)
    return previous


def remove_bias_delta(model: torch.nn.Module, previous: dict[str, torch.Tensor | None]) -> None:
    """Undo apply_bias_delta: restore the values it returned, and remove the biases it added."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in previous.items():
            if tensor is None:
                remove_added_bias(model.get_submodule(name.removesuffix(".bias")))
            else:
                params[name].copy_(tensor)


def delta_added_biases(metadata: dict[str, str] | None) -> list[str]:
    """The delta's tensors that its base does not have: biases --add-biases created."""
    text = (metadata or {}).get("added_biases", "[]")
    try:
        added = json.loads(text)
    except json.JSONDecodeError:
        added = None
    if not (isinstance(added, list) and all(isinstance(name, str) for name in added)):
        raise InputError(f"its added_biases metadata is not a JSON list of tensor names: {text[:60]!r}")
    return added


def delta_template(metadata: dict[str, str] | None) -> tuple[str, str | None]:
    """How the delta's training prompts were written: ("seed", None), or ("chat", the template's hash).
    Deltas from before templates were recorded trained on the seed's."""
    metadata = metadata or {}
    template, digest = metadata.get("template", "seed"), metadata.get("chat_template_hash")
    if template not in TEMPLATES:
        raise InputError(f"its template metadata is {template[:20]!r}, not one of {', '.join(TEMPLATES)}")
    if template == "chat" and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{16}", digest)):
        raise InputError(f"its chat_template_hash metadata is not 16 hex digits: {str(digest)[:20]!r}")
    return template, digest if template == "chat" else None


def _bias_less_linear(model: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    """The Linear layer that the bias called name belongs on, if the model has it without a bias."""
    try:
        module = model.get_submodule(name.removesuffix(".bias")) if name.endswith(".bias") else None
    except AttributeError:
        return None
    return module if isinstance(module, torch.nn.Linear) and module.bias is None else None


def save_model_folder(folder: Path, model, tokenizer, state_dict: dict | None = None) -> None:
    """Write a Hugging Face model folder, replacing any old one only once the new one is whole.

    state_dict, when given, holds the weights to write (under --fsdp, gathered from the shards)."""
    folder = Path(folder)
    refuse_non_finite(dict(model.named_parameters()) if state_dict is None else state_dict, "the trained model")
    staging = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        try:
            model.save_pretrained(staging, state_dict=state_dict)
        except SafetensorError as error:  # safetensors names a full disk only in its message
            raise _os_error(error, staging) from None
        tokenizer.save_pretrained(staging)
        mode = 0o666 & ~umask()  # safetensors creates its files 0600
        for file in staging.rglob("*"):
            if file.is_file():
                os.chmod(file, mode)
        retired = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        if folder.exists():
            os.replace(folder, retired)
        os.replace(staging, folder)
        shutil.rmtree(retired, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _os_error(error: Exception, path: Path) -> Exception:
    """The OSError behind a library's "... (os error 28)", or the error itself."""
    number = re.search(r"os error (\d+)", str(error))
    return OSError(int(number.group(1)), os.strerror(int(number.group(1))), str(path)) if number else error
