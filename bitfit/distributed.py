"""Training on several processes (torchrun): who am I, and the few sums the ranks share.

Every rank holds the whole model and reads its own slice of each optimizer step's examples.
Only gradients of the trainable tensors cross the wire, once per optimizer step; in BitFit
they are the biases, ~1.6 MB for a 1.1B model, so the sync costs next to nothing. A plain
all-reduce does it instead of DistributedDataParallel: DDP's hooks would sync after every
micro-batch unless each but the last were wrapped in no_sync(), which hides the order of events.

With one process (no torchrun, or --nproc_per_node 1) every helper here returns at once.
"""

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class World:
    rank: int = 0  # this process among all of them
    world_size: int = 1
    local_rank: int = 0  # this process on its machine: which GPU it drives

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and shows the progress bar."""
        return self.rank == 0


SINGLE = World()


def setup(device: torch.device) -> World:
    """Join the process group that torchrun started, or return SINGLE when there is none."""
    # torchrun tells each process its place through these variables, and nothing else says it:
    # this is the one spot where bitfit reads the environment.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    world = World(rank=int(os.environ["RANK"]), world_size=world_size, local_rank=int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(world.local_rank)  # one GPU per process, before NCCL starts using one
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(window: list[list[int]], batch_size: int, world: World) -> list[list[int]]:
    """This rank's part of a global window: its batch_size slice of each global micro-batch.

    The global micro-batches hold batch_size x world_size examples in the single-process order,
    so N ranks at --batch-size B see together what one process sees at --batch-size N*B. The
    short last micro-batch of an epoch may leave a rank nothing: that slice is dropped.
    """
    start = world.rank * batch_size
    return [ids[start:start + batch_size] for ids in window if ids[start:start + batch_size]]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum tensor over the ranks, in place, and return it."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: ranks must agree on when to stop."""
    if not dist.is_initialized():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)], device=device)).item())


def all_reduce_grads(params: list[torch.Tensor]) -> None:
    """Sum the gradients over the ranks in one all-reduce of one flat buffer.

    A sum, not a mean: each rank's loss was already divided by the label tokens of the whole
    global window, so the summed gradient is that of the global token-weighted loss.
    Under --fsdp the parameters are shards (DTensors) whose gradients FSDP has already summed in
    the last backward pass (bitfit.fsdp): nothing is left to do.
    """
    if not dist.is_initialized():
        return
    from torch.distributed.tensor import DTensor  # imported here: one process never needs it

    params = [param for param in params if not isinstance(param, DTensor)]
    if not params:
        return
    for param in params:
        if param.grad is None:  # a rank whose share of the window was empty still takes part
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in params])
    dist.all_reduce(flat)
    offset = 0
    for param in params:
        param.grad.copy_(flat[offset:offset + param.numel()].view_as(param.grad))
        offset += param.numel()


def gather_objects(obj) -> list:
    """Every rank's obj, in rank order (a one-item list with one process)."""
    if not dist.is_initialized():
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered
