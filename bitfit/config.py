"""A training run's settings: one dataclass, validated once, saved with the run."""

import dataclasses
import difflib
import json
import math
import re
import typing
from pathlib import Path

import yaml

from bitfit.errors import InputError

ASSETS = Path(__file__).resolve().parent / "assets"

# The default run needs no network: a tiny GPT-2 whose config and tokenizer ship in the
# package (weights are drawn from a fixed seed) and a small alpaca-format file written for
# this project.
DEFAULT_MODEL = "builtin:tiny-gpt2"
DEFAULT_DATA = str(ASSETS / "alpaca_sample.json")

MODES = ("bitfit", "full")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("fp32", "bf16", "fp16")
QUANTIZE = ("nf4",)
REPORT_TO = ("tensorboard",)
# Data formats, told apart by their columns (bitfit.data.formats); prompt formats (bitfit.data.templates).
FORMATS = ("alpaca", "prompt-completion", "messages", "sharegpt")
# human-assistant is the seed notebook's "Human: ... Assistant: " prompt; it was called "seed", which
# also names the random seed (--seed), so the old name stays only as an alias, in flags and in files.
TEMPLATES = ("human-assistant", "chat")
TEMPLATE_ALIASES = {"seed": "human-assistant"}

# BitFit trains ~0.04% of the numbers, each bias nudging a whole feature, so it needs far
# larger steps than full fine-tuning: the BitFit paper used 1e-4..1e-3. Full fine-tuning
# uses 5e-5, the Hugging Face Trainer default that the seed notebook ran with.
DEFAULT_LR = {"bitfit": 1e-3, "full": 5e-5}
# Far above any useful rate, and below where AdamW's fp32 step (lr / (1 - 0.9^t), up to 10 x lr
# in the first steps) overflows; larger values end in a RuntimeError inside the optimizer.
MAX_LR = 1e30
# Seeds are 64-bit in torch; a run adds the epoch and the rank to its seed, so leave room above.
SEED_LIMIT = 2**63


@dataclasses.dataclass
class TrainConfig:
    mode: str = "bitfit"
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    split: str = "train"
    limit: int | None = None  # use the first N rows
    max_len: int = 256  # tokens per example, prompt included
    format: str | None = None  # the data's format (FORMATS); None: told by its columns
    template: str | None = None  # human-assistant or chat; None: chat where the tokenizer has a chat template
    batch_size: int = 1  # examples per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
    # How the window (batch_size x grad_accum examples) is executed: micro-batches of this many examples,
    # sorted by length within the window; "auto" picks one for speed (bitfit.training.micro_batch); None:
    # the batch_size micro-batches as they are. The update is the same either way: the math is the window.
    micro_batch: int | str | None = None
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    lr: float | None = None  # peak learning rate; None picks DEFAULT_LR[mode]
    warmup_ratio: float = 0.1  # fraction of the optimizer steps spent warming up
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    log_every: int = 10  # optimizer steps between lines in metrics.jsonl
    eval_size: float | None = None  # rows held out for evaluation: a count, or a fraction if < 1
    eval_every: int | None = None  # optimizer steps between evaluations (also before and after)
    save_every: int | None = None  # optimizer steps between resumable checkpoints
    output_dir: str | None = None  # None means runs/<mode>
    device: str = "auto"
    dtype: str = "fp32"  # fp32, or bf16/fp16 autocast (see bitfit.model.compute.weights_dtype)
    group_by_length: bool = False  # micro-batches of similar lengths: less padding
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    compile: bool = False  # torch.compile the transformer body
    bias_terms: str = "all"  # BitFit: comma list of bias groups or regular expressions (bitfit.model.bias_terms)
    add_biases: bool = False  # BitFit: give the chosen bias-less Linear layers zero biases to train
    quantize: str | None = None  # BitFit: "nf4" holds the frozen block weights in 4 bits (bitfit.model.quantize)
    fsdp: bool = False  # under torchrun: shard every parameter over the ranks (bitfit.parallel.fsdp)
    report_to: str | None = None  # "tensorboard": the metrics as TensorBoard event files too

    def __post_init__(self):
        self.template = canonical_template(self.template)
        _check_choice("--mode", self.mode, MODES)
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--dtype", self.dtype, DTYPES)
        for flag, value, choices in [("--format", self.format, FORMATS), ("--template", self.template, TEMPLATES)]:
            if value is not None:
                _check_choice(flag, value, choices)
        for flag, value in [("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--max-len", self.max_len), ("--epochs", self.epochs),
                            ("--log-every", self.log_every)]:
            _check_positive(flag, value)
        for flag, value in [("--limit", self.limit), ("--max-steps", self.max_steps),
                            ("--eval-size", self.eval_size), ("--eval-every", self.eval_every),
                            ("--save-every", self.save_every)]:
            if value is not None:
                _check_positive(flag, value)
        if self.micro_batch is not None and self.micro_batch != "auto" and not (
                isinstance(self.micro_batch, int) and not isinstance(self.micro_batch, bool) and self.micro_batch > 0):
            raise InputError(f"--micro-batch must be a positive whole number or auto, got {self.micro_batch!r}")
        if self.eval_size is not None and self.eval_size > 1 and self.eval_size != int(self.eval_size):
            raise InputError(f"--eval-size must be a row count or a fraction below 1, got {self.eval_size}")
        if self.eval_every is not None and self.eval_size is None:
            raise InputError("--eval-every needs --eval-size: there is nothing to evaluate on")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        _check_positive("--lr", self.lr)
        if self.lr > MAX_LR:
            raise InputError(f"--lr must be at most {MAX_LR:g}, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.lr * self.weight_decay >= 1:
            # AdamW multiplies each trained tensor by (1 - lr x weight_decay) every step.
            raise InputError(f"--weight-decay {self.weight_decay} x --lr {self.lr} must be below 1: AdamW "
                             f"scales the trained tensors by 1 - lr x weight decay at every step")
        check_seed(self.seed)
        _check_positive("--max-grad-norm", self.max_grad_norm)
        if not all(term.strip() for term in self.bias_terms.split(",")):
            raise InputError(f"--bias-terms must be a comma list of bias groups or regular expressions "
                             f"with no empty term, got {self.bias_terms!r}")
        if self.mode == "full" and self.bias_terms != "all":
            raise InputError(f"--bias-terms {self.bias_terms} chooses biases for --mode bitfit; "
                             f"--mode full trains every parameter")
        if self.mode == "full" and self.add_biases:
            raise InputError("--add-biases gives a bias-free model biases for --mode bitfit to train; "
                             "--mode full trains every weight as it is")
        if self.quantize is not None:
            _check_choice("--quantize", self.quantize, QUANTIZE)
            if self.mode == "full":
                raise InputError(f"--quantize {self.quantize} holds the frozen weights in 4 bits for --mode "
                                 f"bitfit; --mode full trains every weight, and quantized weights cannot be trained")
        if self.report_to is not None:
            _check_choice("--report-to", self.report_to, REPORT_TO)
        if self.fsdp and self.dtype == "fp16":
            raise InputError("--fsdp with --dtype fp16 is not supported (fp16's loss scaling would have to agree "
                             "across the shards); use --dtype bf16")
        if self.fsdp and self.micro_batch == "auto":
            raise InputError("--fsdp with --micro-batch auto is not supported (probing would run the shards' "
                             "collectives out of step); give --micro-batch a number")
        if self.fsdp and self.compile:
            raise InputError("--fsdp with --compile is not supported; leave one out")
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def canonical_template(name: str | None) -> str | None:
    """A template's name as bitfit writes it now: seed, its old name, is human-assistant."""
    return TEMPLATE_ALIASES.get(name, name)


def check_seed(seed, flag="--seed"):
    if not (isinstance(seed, int) and 0 <= seed < SEED_LIMIT):
        raise InputError(f"{flag} must be a whole number from 0 to 2**63 - 1, got {seed}")


def _check_choice(flag, value, choices):
    if value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(flag, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be a positive number, got {value}")


# --- Settings from a file (python train.py --config FILE) ---

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")


def read_config_file(path: str) -> dict:
    """The settings in a JSON or YAML file, checked: known keys, values of the right type, in range.

    A config file is a run's settings, the keys of train_config.json, so a run's own
    train_config.json is one. It must make a valid run on its own; command-line flags then
    override it (train.py).
    """
    settings = _parse_config_file(Path(path))
    fields = {field.name: field.type for field in dataclasses.fields(TrainConfig)}
    for key, value in settings.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"the settings are: {', '.join(fields)}"
            raise InputError(f"{path}: unknown setting {key!r} ({hint})")
        if not _is_of_type(value, fields[key]):
            raise InputError(f"{path}: {key} must be {_type_name(fields[key])}, got {value!r}")
    try:
        TrainConfig(**settings)  # ranges and combinations, checked as for flags
    except InputError as error:
        # TrainConfig's checks name the command-line flags; name the file's keys instead.
        message = str(error)
        for key in fields:
            message = re.sub(re.escape("--" + key.replace("_", "-")) + r"(?![\w-])", key, message)
        raise InputError(f"{path}: {message}") from None
    # train_config.json records lr and output_dir as they were resolved from the mode. Where they
    # are just that mode's defaults, leave them out, so that they follow a --mode given on the
    # command line (a BitFit run's learning rate would wreck full fine-tuning).
    mode_defaults = TrainConfig(mode=settings.get("mode", TrainConfig.mode))
    for key in ("lr", "output_dir"):
        if key in settings and settings[key] == getattr(mode_defaults, key):
            del settings[key]
    return settings


def _parse_config_file(path: Path) -> dict:
    if path.suffix.lower() not in CONFIG_SUFFIXES:
        raise InputError(f"--config {path}: expected a .json, .yaml or .yml file")
    if not path.is_file():
        raise InputError(f"--config {path}: no such file")
    try:
        text = path.read_text()
        settings = json.loads(text) if path.suffix.lower() == ".json" else yaml.load(text, Loader=_YamlLoader)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text file") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InputError(f"{path}: not valid YAML ({getattr(error, 'problem', None) or error}{where})") from None
    if not isinstance(settings, dict):
        found = "nothing" if settings is None else f"a {type(settings).__name__}"
        raise InputError(f"{path}: expected settings as key: value pairs, found {found}")
    return settings


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads 1e-3 as text (it wants 1.0e-3); this reads it as a number."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                  re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                  list("-+.0123456789"))


def _is_of_type(value, annotation) -> bool:
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):  # True is an int to Python, not to a setting
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True  # 1 means 1.0 to a float setting
    return type(value) in allowed


def _type_name(annotation) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
             type(None): "null"}
    return " or ".join(names[kind] for kind in typing.get_args(annotation) or (annotation,))
