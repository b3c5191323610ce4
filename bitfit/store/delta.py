"""A delta: what a BitFit run trained (bias.safetensors), tied to the base it was trained on.

A delta holds the trained tensors under their state-dict names (the biases: ~1.6 MB for a 1B model)
and records, in its metadata, the base's id or path, the model class, each tensor's shape and dtype,
a fingerprint of the frozen weights (bitfit.model.fingerprint), the biases --add-biases created and
the prompt template, so that applying it to the wrong base is refused rather than silently producing
nonsense. Applying a delta copies its tensors into a base in memory; merging writes the result as an
ordinary model folder (bitfit.store.merge).
"""

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from bitfit.config import TEMPLATES, canonical_template
from bitfit.data.templates import chat_template_hash, choose_template
from bitfit.errors import InputError
from bitfit.model.added_biases import add_zero_bias, is_added_bias, remove_added_bias
from bitfit.model.fingerprint import base_fingerprint
from bitfit.store.files import atomic_write, first_non_finite, refuse_non_finite

BIAS_FILE = "bias.safetensors"
# /2 added the tensor listing and the base fingerprint; /1 files still load, unchecked by fingerprint.
DELTA_FORMAT = "bitfit-bias-delta/2"
DELTA_FORMATS = ("bitfit-bias-delta/1", DELTA_FORMAT)  # the ones this bitfit reads


def save_bias_delta(path: Path, model: torch.nn.Module, names: list[str], base_model: str,
                    added_biases: list[str] | None = None, quantized_base: str | None = None,
                    template: str = "human-assistant", chat_template_hash: str | None = None) -> None:
    """Save the named trained tensors, under their state-dict names, with what they must be paired with.

    The metadata (safetensors allows only str -> str) records the base's id or path, the model
    class, each tensor's shape and dtype, and a fingerprint of the frozen weights, so that
    applying the delta to the wrong base is refused rather than silently producing nonsense.
    added_biases lists the tensors the base does not have (--add-biases); by default, those
    of names that bitfit.model.added_biases.add_zero_bias marked. quantized_base ("nf4") says the base was held
    in 4 bits while the delta trained; the fingerprint is the unquantized base's all the same.
    template says how the training prompts were written ("human-assistant" or "chat",
    bitfit.data.templates), and
    chat_template_hash which chat template: generate.py prompts the tuned model the same way.
    """
    params = dict(model.named_parameters())
    tensors = {name: params[name].detach().to("cpu", copy=True) for name in names}
    write_bias_delta(path, tensors, bias_delta_metadata(model, names, base_model, added_biases, quantized_base,
                                                        template, chat_template_hash))


def bias_delta_metadata(model: torch.nn.Module, names: list[str], base_model: str,
                        added_biases: list[str] | None = None, quantized_base: str | None = None,
                        template: str = "human-assistant", chat_template_hash: str | None = None) -> dict[str, str]:
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


def find_bias_file(path: str) -> Path:
    """Accept a run folder (holding bias.safetensors) or the file itself."""
    candidate = Path(path)
    if candidate.is_dir():
        if not (candidate / BIAS_FILE).is_file() and (candidate / "checkpoint.pt").is_file():
            raise InputError(f"{candidate} holds a run that did not finish (a checkpoint, no {BIAS_FILE} yet); finish "
                             f"it with: python train.py --resume {candidate}")
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
        check_delta_format(metadata, tensors)
        delta_added_biases(metadata)
        delta_template(metadata)
    except InputError as error:
        raise InputError(f"{file}: {error}") from None
    return tensors, metadata


def check_delta_format(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """A format this bitfit reads, and (from /2 on) every tensor its listing names, each of its shape: a
    delta with one missing is incomplete, which a base fingerprint would misreport as another base."""
    version = metadata.get("format")
    if version is not None and version not in DELTA_FORMATS:
        raise InputError(f"its format is {version[:40]!r}, and this bitfit reads {', '.join(DELTA_FORMATS)} (written "
                         f"by a newer bitfit?)")
    if "tensors" not in metadata:
        return
    try:
        listing = json.loads(metadata["tensors"])
        shapes = {name: list(entry["shape"]) for name, entry in listing.items()}
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InputError(f"its tensors metadata is not a listing of names and shapes: {metadata['tensors'][:60]!r}"
                         ) from None
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise InputError(f"the delta is incomplete: it lists {len(shapes)} tensors and holds {len(tensors)} (missing "
                         f"{', '.join(missing[:3])}{', ...' * (len(missing) > 3)})")
    unlisted = sorted(set(tensors) - set(shapes))
    changed = [name for name in shapes if list(tensors[name].shape) != shapes[name]]
    if unlisted or changed:
        raise InputError(f"the delta does not match its own listing ({', '.join((unlisted + changed)[:3])}): it "
                         f"was altered after it was written")


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
    """How the delta's training prompts were written: ("human-assistant", None), or ("chat", the template's
    hash). Deltas from before templates were recorded trained on human-assistant, which they may call seed."""
    metadata = metadata or {}
    template = canonical_template(metadata.get("template", "human-assistant"))
    digest = metadata.get("chat_template_hash")
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


def prompt_template(tokenizer, metadatas: list[dict], requested: str | None = None, force: bool = False) -> str:
    """The prompt format to answer in: --template if given, else the one the deltas were trained with,
    else chat where the tokenizer has a chat template. A delta trained through another chat template
    than this tokenizer's is refused unless force: its prompts would not be the ones it learned from."""
    recorded = sorted({delta_template(metadata) for metadata in metadatas}, key=str)
    if requested is None and len({template for template, _ in recorded}) > 1:
        raise InputError(f"the bias deltas were trained with different prompt formats "
                         f"({', '.join(sorted({template for template, _ in recorded}))}); choose one with --template")
    template = choose_template(requested or (recorded[0][0] if recorded else None), tokenizer)
    if template == "chat" and not force:
        actual = chat_template_hash(tokenizer)
        for _, digest in recorded:
            if digest is not None and digest != actual:
                raise InputError(f"the bias delta was trained through chat template {digest}, and this tokenizer's "
                                 f"is {actual}: the prompts would differ from those it learned from; load the "
                                 f"recorded base, or --force to prompt through this template")
    return template
