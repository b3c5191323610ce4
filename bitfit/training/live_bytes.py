"""The bytes of live tensors, counted as CUDA's caching allocator counts them for max_memory_allocated.

torch.cuda.max_memory_allocated is the peak of one number: the bytes of the memory blocks handed to
tensors that are still alive. A block holds one tensor *storage* (views share their base's), and its
size is the storage's bytes rounded up to a multiple of 512, the allocator's smallest unit. So the
same number can be counted without a GPU: watch every operator's output, add each new storage when
it appears and take it off when Python frees it (or, as FSDP frees a gathered layer, when its storage
is resized to nothing). LiveTensorBytes does that, on real tensors or on FakeTensorMode's fake ones,
which have sizes but no memory (bitfit.training.estimate).

What it cannot see is the allocator's slack: a large free block it hands out whole because the
rest (under 1 MiB) is not worth splitting off. A GPU's figure can be that much higher.
"""

import dataclasses
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import (TorchDispatchMode, is_traceable_wrapper_subclass,
                                          is_traceable_wrapper_subclass_type)
from torch.utils._pytree import tree_flatten
from torch.utils.module_tracker import ModuleTracker

ALLOCATOR_UNIT = 512  # bytes: CUDA's caching allocator rounds every block up to a multiple of this


def allocated_bytes(storage_bytes: int) -> int:
    """What a storage of this many bytes costs in max_memory_allocated (an empty one costs nothing)."""
    return -(-storage_bytes // ALLOCATOR_UNIT) * ALLOCATOR_UNIT


@dataclasses.dataclass(eq=False)
class Block:
    """One storage's block: its size, and when it was made and freed (in operators counted)."""
    bytes: int
    born: int
    freed: int | None = None
    kind: str = "other"  # weights, trained, gradients, optimizer: what set_kind says; the rest is other

    def live_at(self, moment: int) -> bool:
        return self.born <= moment and (self.freed is None or self.freed > moment)


class LiveTensorBytes(TorchDispatchMode):
    """Count the blocks of live tensor storages; remember the peak, when and where it fell.

    with LiveTensorBytes() as live:   # tensors made before: live.track(...) them
        ...
    live.peak, live.where, live.bytes_at_peak()
    """

    def __init__(self, fake_mode=None):
        super().__init__()
        self.fake_mode = fake_mode  # the FakeTensorMode whose tensors stand for the device's (None: real tensors)
        self.paused = 0  # inside not_counted()
        self.blocks: dict[int, Block] = {}  # id of a live storage -> its block
        self.history: list[Block] = []  # every block, freed ones too: what the peak was made of
        self.now = self.peak = self.moment = self.peak_moment = 0
        self.where = "before the step"
        self.phase = self.stage = ""  # what the caller says is running: "micro-batch 2", "forward"
        self.modules = ModuleTracker()  # which module the forward or backward pass is in

    def __enter__(self):
        self.modules.__enter__()
        self._resize = torch.UntypedStorage.resize_
        torch.UntypedStorage.resize_ = lambda storage, size: self._resized(storage, size)
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        torch.UntypedStorage.resize_ = self._resize
        self.modules.__exit__(*exc)

    def _resized(self, storage, size):
        """FSDP frees a gathered weight by resizing its storage to nothing, and gathers into it again by
        resizing it back, which no operator shows: the storage's block is freed and, if it has a size, a
        new one made."""
        result = self._resize(storage, size)
        if id(storage) in self.blocks:
            self._free(id(storage))
            self._add(id(storage), storage, None)  # the finalizer made when it was first seen frees it
        return result

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(kind) for kind in types):
            return NotImplemented  # a DTensor, a 4-bit weight: let it run the operators on its inner tensors, seen here
        out = func(*args, **(kwargs or {}))
        self.moment += 1
        for value in tree_flatten((out, args, kwargs))[0]:  # an input seen first is new here too (the batch)
            if isinstance(value, torch.Tensor):
                self.track(value, func)
        return out

    def track(self, tensor: torch.Tensor, func=None) -> list[Block]:
        """Count tensor's storage if it is new; return its blocks. A tensor subclass that wraps others
        (torchao's 4-bit NF4Tensor: codes and scales) is the memory of those."""
        if is_traceable_wrapper_subclass(tensor):
            names, _ = tensor.__tensor_flatten__()
            inner = [getattr(tensor, name) for name in names]
            return [block for part in inner if isinstance(part, torch.Tensor) for block in self.track(part, func)]
        if self.paused or isinstance(tensor, FakeTensor) and tensor.fake_mode is not self.fake_mode:
            # A fake tensor of someone else's: DTensor works out its outputs' shapes on fake tensors of its own
            # (once per operator and layout, cached): no memory is behind them, on a GPU either.
            return []
        storage = tensor.untyped_storage()
        key = id(storage)  # the storage object lives as long as its memory, so its id stays its own
        if key in self.blocks:
            return [self.blocks[key]]
        weakref.finalize(storage, self._free, key)
        return [self._add(key, storage, func)]

    def _add(self, key: int, storage, func) -> Block:
        block = Block(allocated_bytes(storage.nbytes()), born=self.moment)
        self.blocks[key] = block
        self.history.append(block)
        self.now += block.bytes
        if self.now > self.peak:
            self.peak, self.peak_moment = self.now, self.moment
            self.where = self._describe_where(func)
        return block

    def not_counted(self):
        """A context in which tensors made stand for no memory (see bitfit.training.estimate); it may be
        entered again and again."""
        live = self

        class NotCounted:
            def __enter__(self):
                live.paused += 1

            def __exit__(self, *exc):
                live.paused -= 1

        return NotCounted()

    def set_kind(self, tensors, kind: str) -> None:
        for tensor in tensors:
            for block in self.track(tensor) if tensor is not None else ():
                block.kind = kind

    def reset_peak(self) -> None:
        """As torch.cuda.reset_peak_memory_stats: the peak starts again from what is live now."""
        self.peak, self.peak_moment, self.where = self.now, self.moment, "before the step"

    def bytes_at_peak(self) -> dict[str, int]:
        """The peak, by kind."""
        totals = {}
        for block in self.history:
            if block.live_at(self.peak_moment):
                totals[block.kind] = totals.get(block.kind, 0) + block.bytes
        return totals

    def _free(self, key: int) -> None:
        block = self.blocks.pop(key, None)
        if block is None:  # freed already, by a resize to nothing
            return
        block.freed = self.moment + 1  # live through the operator that was running, gone after it
        self.now -= block.bytes

    def _describe_where(self, func) -> str:
        """The phase the caller named, the pass and the innermost module running, and the operator."""
        stage = "backward" if self.modules.is_bw and "micro-batch" in self.phase else self.stage
        # ModuleTracker names a module by its path under the model's class ("LlamaModel.layers.3.mlp").
        inner = max((name.partition(".")[2] for name in self.modules.parents if "." in name), key=len, default="")
        where = ", ".join(part for part in (self.phase, stage, f"in {inner}" if inner else "") if part)
        return f"{where} ({func})" if func is not None else where
