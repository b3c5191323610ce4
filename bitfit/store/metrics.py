"""Memory, throughput and the end-of-run summary: numbers with units a person can read."""

import json
import resource
from pathlib import Path

import torch

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
    """metrics.jsonl: one JSON object per line, flushed as written so a crash keeps the lines.

    A resumed run keeps the lines up to its checkpoint's step and drops any written after it,
    which the resumed run is about to write again.
    """

    def __init__(self, path: Path, keep_through_step: int | None = None):
        if keep_through_step is not None and path.exists():
            kept = [line + "\n" for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= keep_through_step]
            atomic_write(path, lambda tmp: tmp.write_text("".join(kept)))
            self.file = open(path, "a")
        else:
            self.file = open(path, "w")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def gib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**30:.2f} GiB"


def readable_bytes(num_bytes: int | None) -> str:
    """GiB, or MiB below one GiB (a tiny model's weights would read 0.00 GiB)."""
    if num_bytes is None or num_bytes >= 2**30:
        return gib(num_bytes)
    return f"{num_bytes / 2**20:.1f} MiB"


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
        ("peak GPU memory", gib(summary["peak_memory_bytes"])),
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
