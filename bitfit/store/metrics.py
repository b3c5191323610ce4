"""Memory, throughput and the end-of-run summary: numbers with units a person can read."""

import json
import resource
from pathlib import Path

import torch

from bitfit.errors import InputError
from bitfit.store.files import atomic_write


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int | None:
    """Most GPU memory held by tensors since the last reset; None on CPU, where torch has no counter."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return None


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers occupy (tied tensors once); a weight held in 4 bits
    (bitfit.model.quantize) counts what it stores: its codes, scales and constants."""
    return sum(tensor_bytes(tensor) for tensor in [*model.parameters(), *model.buffers()])


def parameter_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this process holds: under --fsdp its shards (a DTensor's local part)."""
    return sum(tensor_bytes(param.to_local() if hasattr(param, "to_local") else param)
               for param in model.parameters())


def tensor_bytes(tensor: torch.Tensor) -> int:
    if hasattr(type(tensor), "__tensor_flatten__"):  # a tensor subclass such as torchao's NF4Tensor
        inner, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in inner)
    return tensor.numel() * tensor.element_size()


def peak_rss_bytes() -> int:
    """The process's peak resident memory over its whole life (loading included); Linux reports KiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def work_done(progress: dict) -> dict:
    """What a training loop's progress (bitfit.core.loop.new_progress) amounts to: counts and rates."""
    seconds = progress["seconds"]
    return {
        "optimizer_steps": progress["step"],
        "samples": progress["samples"],
        "tokens": progress["tokens"],
        "label_tokens": progress["label_tokens"],
        "padding_fraction": 1 - progress["tokens"] / progress["tokens_with_padding"],
        # Token-weighted over the run, like each step's loss: total loss / total label tokens.
        "train_loss": progress["loss_sum"] / progress["label_tokens"],
        "seconds": seconds,
        "samples_per_s": progress["samples"] / seconds,
        "tokens_per_s": progress["tokens"] / seconds,
    }


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written so a crash keeps the lines; with
    tensorboard (a folder), the same scalars as TensorBoard event files too (--report-to tensorboard).

    A resumed run keeps the lines up to its checkpoint's step and drops any written after it,
    which the resumed run is about to write again; TensorBoard's reader drops those events likewise
    (the writer's purge_step), so both continue on the same optimizer-step axis.
    """

    def __init__(self, path: Path, keep_through_step: int | None = None, tensorboard: Path | None = None):
        if keep_through_step is not None and path.exists():
            kept = [line + "\n" for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")
        self.tensorboard = None
        if tensorboard is not None:
            SummaryWriter = import_summary_writer()
            purge_step = None if keep_through_step is None else keep_through_step + 1
            self.tensorboard = SummaryWriter(log_dir=str(tensorboard), purge_step=purge_step)

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if record.get(key) is not None:
                    self.tensorboard.add_scalar(tag, record[key], global_step=record["step"])
            self.tensorboard.flush()  # as metrics.jsonl is: a crash keeps what was logged

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


# metrics.jsonl's keys -> TensorBoard's tags, on the optimizer-step axis.
TENSORBOARD_TAGS = {"loss": "train/loss", "lr": "train/learning_rate", "grad_norm": "train/grad_norm",
                    "tokens_per_s": "train/tokens_per_s", "eval_loss": "eval/loss",
                    "eval_perplexity": "eval/perplexity"}


def import_summary_writer():
    """torch's SummaryWriter, which needs the tensorboard package: one line where it is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise InputError("--report-to tensorboard needs the tensorboard package (pip install tensorboard)") from None
    return SummaryWriter


def gib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def readable_bytes(num_bytes: int | None) -> str:
    """GiB, or MiB below one GiB and KiB below one MiB (a tiny model's weights would read 0.00 GiB)."""
    if num_bytes is None or num_bytes >= 2**30:
        return gib(num_bytes)
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"


def format_summary(summary: dict) -> str:
    """The summary as a short two-column table."""
    rows = [
        ("mode", summary["mode"]),
        ("model", summary["model"]),
        ("trainable params", f"{summary['trainable_params']:,} / {summary['total_params']:,} "
                             f"({summary['trainable_percent']:.4f}%)"),
        ("optimizer steps", f"{summary['optimizer_steps']:,}"),
        ("samples", f"{summary['samples']:,} ({summary['dropped_rows']:,} rows dropped)"),
        ("tokens", f"{summary['tokens']:,}"),
        ("train loss", f"{summary['train_loss']:.4f}"),
        ("time", f"{summary['seconds']:.1f} s"),
        ("throughput", f"{summary['samples_per_s']:.2f} samples/s, "
                       f"{summary['tokens_per_s']:,.0f} tokens/s"),
        ("weights", readable_bytes(summary["weight_bytes"]) + (f" ({summary['quantize']} blocks)"
                                                               if summary["quantize"] else "")),
        ("peak GPU memory", gib(summary["peak_memory_bytes"]) + (
            f" (estimated {gib(summary['estimated_peak_memory_bytes'])}: {summary['peak_memory_vs_estimate']:.2f}x)"
            if summary.get("peak_memory_vs_estimate") else "")),
        ("peak RSS", gib(summary["peak_rss_bytes"])),
        ("device", summary["device"]),
    ]
    if summary["world_size"] > 1:
        rows.append(("ranks", f"{summary['world_size']} (counts and throughput are their sum, "
                              f"peak GPU memory the largest rank's)"))
    if summary["fsdp"]:
        rows.append(("parameters", f"{gib(max(summary['parameter_bytes_per_rank']))} per rank at most "
                                   f"(sharded by --fsdp)"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
