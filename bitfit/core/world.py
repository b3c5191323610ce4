"""The processes a step runs on. By default one (SINGLE), where every sum is the number itself.

train_step and train_loop take a world and call it at the few points where several processes must
agree: the rank's slice of a window, the sums of gradients, losses and counts, and (under --fsdp)
when gradients cross the wire. In one process each call returns at once, so the step reads as if
it were not there. bitfit.parallel gives the worlds of torchrun (every rank the whole model) and of
--fsdp (every rank a shard of every parameter), with the same methods.
"""

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    world_size: int = 1
    local_rank: int = 0  # this process on its machine: which GPU it drives

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows the progress bar."""
        return self.rank == 0

    def shard(self, window: list[list[int]], batch_size: int) -> list[list[int]]:
        """This rank's part of a global window: its batch_size slice of each global micro-batch.

        The global micro-batches hold batch_size x world_size examples in the single-process order,
        so N ranks at --batch-size B see together what one process sees at --batch-size N*B. The
        short last micro-batch of an epoch may leave a rank nothing: that slice is dropped.
        """
        start = self.rank * batch_size
        return [ids[start:start + batch_size] for ids in window if ids[start:start + batch_size]]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """tensor summed over the ranks (in place), and returned."""
        return tensor

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the trainable tensors' gradients over the ranks, once per optimizer step."""

    def sync_gradients_in_backward(self, model, sync: bool) -> None:
        """--fsdp: whether the next backward pass sums the gradients over the ranks (the window's last)."""

    def fill_window(self, batches: list[dict], window_length: int, pad_id: int) -> list[dict]:
        """--fsdp: this rank's micro-batches, made up to the window's count with ones that change nothing."""
        return batches

    def free_gathered_weights(self, model) -> None:
        """--fsdp: let go of weights that forward passes gathered and no backward pass freed."""

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any: ranks must agree on when to stop."""
        return flag

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order."""
        return [obj]


SINGLE = World()
