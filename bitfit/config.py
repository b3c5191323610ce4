"""A training run's settings: one dataclass, validated once, saved with the run."""

import dataclasses
import math
from pathlib import Path

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

# BitFit trains ~0.04% of the numbers, each bias nudging a whole feature, so it needs far
# larger steps than full fine-tuning: the BitFit paper used 1e-4..1e-3. Full fine-tuning
# uses 5e-5, the Hugging Face Trainer default that the seed notebook ran with.
DEFAULT_LR = {"bitfit": 1e-3, "full": 5e-5}


@dataclasses.dataclass
class TrainConfig:
    mode: str = "bitfit"
    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    split: str = "train"
    limit: int | None = None  # use the first N rows
    max_len: int = 256  # tokens per example, prompt included
    batch_size: int = 1  # examples per micro-batch
    grad_accum: int = 8  # micro-batches per optimizer step
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
    dtype: str = "fp32"  # fp32, or bf16/fp16 autocast (see bitfit.model.weights_dtype)
    group_by_length: bool = False  # micro-batches of similar lengths: less padding
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    compile: bool = False  # torch.compile the transformer body
    bias_terms: str = "all"  # BitFit: comma list of bias groups or regular expressions (bitfit.bias)
    add_biases: bool = False  # BitFit: give the chosen bias-less Linear layers zero biases to train
    quantize: str | None = None  # BitFit: "nf4" holds the frozen block weights in 4 bits (bitfit.quantize)

    def __post_init__(self):
        _check_choice("--mode", self.mode, MODES)
        _check_choice("--device", self.device, DEVICES)
        _check_choice("--dtype", self.dtype, DTYPES)
        for flag, value in [("--batch-size", self.batch_size), ("--grad-accum", self.grad_accum),
                            ("--max-len", self.max_len), ("--epochs", self.epochs),
                            ("--log-every", self.log_every)]:
            _check_positive(flag, value)
        for flag, value in [("--limit", self.limit), ("--max-steps", self.max_steps),
                            ("--eval-size", self.eval_size), ("--eval-every", self.eval_every),
                            ("--save-every", self.save_every)]:
            if value is not None:
                _check_positive(flag, value)
        if self.eval_size is not None and self.eval_size > 1 and self.eval_size != int(self.eval_size):
            raise InputError(f"--eval-size must be a row count or a fraction below 1, got {self.eval_size}")
        if self.eval_every is not None and self.eval_size is None:
            raise InputError("--eval-every needs --eval-size: there is nothing to evaluate on")
        if self.lr is None:
            self.lr = DEFAULT_LR[self.mode]
        _check_positive("--lr", self.lr)
        if not 0 <= self.warmup_ratio < 1:
            raise InputError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise InputError(f"--weight-decay must be >= 0, got {self.weight_decay}")
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
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.mode)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_choice(flag, value, choices):
    if value not in choices:
        raise InputError(f"{flag} must be one of {', '.join(choices)}; got {value!r}")


def _check_positive(flag, value):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{flag} must be a positive number, got {value}")
