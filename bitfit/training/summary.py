"""A run's summary (summary.json): what it trained, what it cost, what it gave."""

import platform

import torch

from bitfit.core.loss import perplexity
from bitfit.store.metrics import peak_memory_bytes, peak_rss_bytes, work_done


def build_summary(config, progress, *, trainable, total, device, dropped_rows, eval_rows, world_size=1,
                  peak_memory_per_rank=None, weight_bytes=None, parameter_bytes_per_rank=None,
                  estimated_peak_memory_bytes=None) -> dict:
    """The run's summary; progress's counts are already global (summed over the ranks)."""
    if peak_memory_per_rank is None:
        peak_memory_per_rank = [peak_memory_bytes(device)]
    peak = None if None in peak_memory_per_rank else max(peak_memory_per_rank)
    return {
        "mode": config.mode,
        "model": config.model,
        "data": config.data,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        # Counts and rates; the seconds are rank 0's clock (the ranks wait for each other every step).
        **work_done(progress),
        "world_size": world_size,
        # The largest rank's peak: what a GPU must hold for the run to fit (null on CPU).
        "peak_memory_bytes": peak,
        "peak_memory_bytes_per_rank": peak_memory_per_rank,
        # What bitfit.estimate said before the run (CUDA runs but --fsdp's), and measured / estimated.
        "estimated_peak_memory_bytes": estimated_peak_memory_bytes,
        "peak_memory_vs_estimate": (peak / estimated_peak_memory_bytes
                                    if peak is not None and estimated_peak_memory_bytes else None),
        "fsdp": config.fsdp,
        # The parameters each rank holds between steps: the whole model each, or under --fsdp its shards.
        "parameter_bytes_per_rank": parameter_bytes_per_rank,
        "peak_rss_bytes": peak_rss_bytes(),
        "device": device_name(device),
        "dtype": config.dtype,
        "quantize": config.quantize,
        # What the weights, and the buffers, occupy: the number that --quantize and --dtype change.
        "weight_bytes": weight_bytes,
        "dropped_rows": dropped_rows,
        "eval_rows": eval_rows,
        "eval_loss_before": progress["eval_loss_before"],
        "eval_loss_after": progress["eval_loss_after"],
        "eval_perplexity_before": perplexity(progress["eval_loss_before"]),
        "eval_perplexity_after": perplexity(progress["eval_loss_after"]),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
