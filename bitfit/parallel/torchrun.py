"""Training on several processes (torchrun): who am I, and the few sums the ranks share.

Every rank holds the whole model and reads its own slice of each optimizer step's examples.
Only gradients of the trainable tensors cross the wire, once per optimizer step; in BitFit
they are the biases, ~1.6 MB for a 1.1B model, so the sync costs next to nothing. A plain
all-reduce does it instead of DistributedDataParallel: DDP's hooks would sync after every
micro-batch unless each but the last were wrapped in no_sync(), which hides the order of events.

TorchrunWorld has the methods of bitfit.core.world.World, which train_step and train_loop call;
with one process (no torchrun, or --nproc_per_node 1) setup returns the plain World, and nothing
here runs.
"""

import dataclasses
import os

import torch
import torch.distributed as dist

from bitfit.core.world import SINGLE, World


@dataclasses.dataclass(frozen=True)
class TorchrunWorld(World):
    """Several processes started by torchrun, each with the whole model."""

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Sum the gradients over the ranks in one all-reduce of one flat buffer.

        A sum, not a mean: each rank's loss was already divided by the label tokens of the whole
        global window, so the summed gradient is that of the global token-weighted loss.
        """
        for param in params:
            if param.grad is None:  # a rank whose share of the window was empty still takes part
                param.grad = torch.zeros_like(param)
        flat = torch.cat([param.grad.reshape(-1) for param in params])
        dist.all_reduce(flat)
        offset = 0
        for param in params:
            param.grad.copy_(flat[offset:offset + param.numel()].view_as(param.grad))
            offset += param.numel()

    def any(self, flag: bool, device: torch.device) -> bool:
        return bool(self.sum(torch.tensor([float(flag)], device=device)).item())

    def gather(self, obj) -> list:
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered


def setup(device: torch.device) -> World:
    """Join the process group that torchrun started, or return SINGLE when there is none."""
    # torchrun tells each process its place through these variables, and nothing else says it:
    # this is the one spot where bitfit reads the environment.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    world = TorchrunWorld(rank=int(os.environ["RANK"]), world_size=world_size,
                          local_rank=int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)  # one GPU per process, before NCCL starts using one
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
