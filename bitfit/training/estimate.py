"""Will it fit? The peak memory of a run, worked out before the run, with no GPU and no weights.

The estimate does what the run does, on fake tensors: bitfit's own setup (setup_model: the frozen
weights, added biases, 4-bit layers, fp32 master copies, --fsdp's shards, AdamW), then train_step on
windows of the longest example the run would train. Under torch's FakeTensorMode every operator works
out its output's size, dtype and device and computes nothing, so a 70B model takes no memory and seconds.
bitfit.training.live_bytes counts the storages as CUDA's caching allocator would report them in
torch.cuda.max_memory_allocated.

Two optimizer steps stand for the whole run: the first makes AdamW's state, which every later step
holds from its start. In the second, two micro-batches stand for the window: the first makes the
gradients, the second runs with them already held, and every later one repeats it.

The fake tensors live on the CPU: a CPU build of torch cannot make fake CUDA tensors that autocast
accepts. The one CUDA difference that counts for memory is put in: AdamW is built fused, as on CUDA
(one kernel, no temporaries; the CPU's plain loop makes one parameter-sized temporary at a time).
"""

import contextlib
import dataclasses
import time
import warnings

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorConverter, FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass_type
from torch.utils._pytree import tree_flatten

from bitfit.config import TrainConfig
from bitfit.core.examples import IGNORE_INDEX, build_example, collate
from bitfit.core.step import train_step
from bitfit.core.world import SINGLE
from bitfit.core.trainable import build_optimizer, is_bias, trainable_parameters
from bitfit.data.rows import load_rows_and_format
from bitfit.data.templates import choose_template
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError
from bitfit.model.compute import weights_dtype
from bitfit.training.live_bytes import LiveTensorBytes
from bitfit.training.setup import setup_model

# The seed notebook's rule of thumb for full fine-tuning with AdamW in fp32, per parameter: 4 bytes of
# weight, 4 of gradient, 8 of AdamW moments, 4 of "activations and temporaries".
RULE_OF_THUMB_BYTES = 20
SMALL_TABLE = 2**16  # numbers
MOST_TOKENS = 2**24  # in a micro-batch: its token ids, mask and labels are real tensors


@dataclasses.dataclass
class MemoryEstimate:
    mode: str
    peak_bytes: int  # what torch.cuda.max_memory_allocated would say after the run
    weights_bytes: int  # the model's parameters and buffers (trained ones included)
    trained_bytes: int  # of which the tensors that train (fp32 master copies)
    gradient_bytes: int
    optimizer_bytes: int  # AdamW's two moments and step counts
    other_bytes: int  # activations, logits, temporaries: the rest of the peak
    where: str  # where in the step the peak falls
    trainable_params: int
    total_params: int
    micro_batch: int  # examples per micro-batch
    tokens: int  # per example (the longest the run would train)
    labels: int  # label tokens of that example
    seconds: float  # how long the estimate took

    @property
    def rule_of_thumb_bytes(self) -> int:
        return RULE_OF_THUMB_BYTES * self.total_params

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "rule_of_thumb_bytes": self.rule_of_thumb_bytes}


def estimate_both_modes(config: TrainConfig, build, example: dict, ranks: int = 1) -> dict[str, MemoryEstimate]:
    """The estimate of config's run, then of the same run in the other mode (--quantize, --add-biases
    and --bias-terms are BitFit's: full mode trains every weight as it is). build(dtype) returns a
    fresh (model on the meta device, tokenizer or None); ranks is the number under --fsdp."""
    other = "full" if config.mode == "bitfit" else "bitfit"
    configs = [config, dataclasses.replace(config, mode=other, quantize=None, bias_terms="all", add_biases=False)]
    estimates = {}
    for each in configs:
        model, _ = build(weights_dtype(each))
        if each.mode == "bitfit" and each is not config and not any(is_bias(name) for name, _ in
                                                                     model.named_parameters()):
            each = dataclasses.replace(each, add_biases=True)  # BitFit on a model without biases trains added ones
        estimates[each.mode] = estimate_peak_memory(model, each, example, ranks=ranks)
    return estimates


def estimate_peak_memory(model, config: TrainConfig, example: dict, ranks: int = 1) -> MemoryEstimate:
    """The peak of config's run on model, every micro-batch of it holding examples like example (its
    longest): two optimizer steps, the second of two micro-batches, as the module's docstring says why.

    model holds the model's shape on the meta device (bitfit.model.loading.load_model_shape); it is
    set up and trained on fake tensors, and is of no use afterwards.
    """
    started = time.perf_counter()
    device = torch.device("cpu")
    micro_batch = config.micro_batch if isinstance(config.micro_batch, int) else config.batch_size
    window = config.batch_size * config.grad_accum
    if min(micro_batch, window) * len(example["input_ids"]) > MOST_TOKENS:
        raise InputError(f"a micro-batch of {min(micro_batch, window):,} x {len(example['input_ids']):,} tokens is "
                         f"more than the estimate takes ({MOST_TOKENS:,} tokens; no GPU trains that many at once)")
    # Every row is the longest, so nothing is padded and the pad id does not matter.
    micro_batches = [collate([example] * size, pad_id=0) for size in _sizes(window, micro_batch)]
    windows = [micro_batches[:1], micro_batches]  # the first step only makes the optimizer's state
    labels = sum(label != IGNORE_INDEX for label in example["labels"])

    fake = FakeTensorMode(allow_non_fake_inputs=True)
    fake.fake_tensor_converter = _FreshViewConverter()
    live = LiveTensorBytes(fake_mode=fake)
    with _ranks(config, ranks, live) as world, fake, _BatchValues(), live, \
            _data_dependent_model_errors(config.model), warnings.catch_warnings():
        # torchao's 4-bit weights compare their storages' addresses, which fake tensors only pretend to have.
        warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
        make_fake(model, device)
        setup = setup_model(model, config, device, world, log=lambda message: None)
        # AdamW as CUDA builds it: fused (its state is made on the first step, so building it again is free).
        optimizer = build_optimizer(model, config, torch.device("cuda"), no_decay=setup.masks)
        _label_kinds(live, model, optimizer)
        model.train()  # as train_loop does: dropout, and --grad-checkpointing, act only in training mode
        live.reset_peak()  # as a run does before training: the peak of the step, the weights included
        count = _name_micro_batches(live, model)
        for step, batches in enumerate(windows, start=1):
            count.update(step=step, micro_batch=0)
            train_step(model, optimizer, batches, labels * window, max_grad_norm=config.max_grad_norm, device=device,
                       dtype=config.dtype, loss_fn=setup.loss_fn, scaler=setup.scaler, world=setup.world)
        at_peak = live.bytes_at_peak()
    weights = at_peak.get("weights", 0) + at_peak.get("trained", 0)
    gradients, optimizer_state = at_peak.get("gradients", 0), at_peak.get("optimizer", 0)
    return MemoryEstimate(
        mode=config.mode, peak_bytes=live.peak, weights_bytes=weights, trained_bytes=at_peak.get("trained", 0),
        gradient_bytes=gradients, optimizer_bytes=optimizer_state,
        other_bytes=live.peak - weights - gradients - optimizer_state, where=live.where,
        trainable_params=setup.trainable, total_params=setup.total, micro_batch=micro_batch,
        tokens=len(example["input_ids"]), labels=labels,
        seconds=time.perf_counter() - started)


def estimate_run(config: TrainConfig, examples) -> int:
    """The estimated peak of a run about to train on examples (bitfit.data.tokenize.LazyExamples): a CUDA
    run writes it in its summary beside what it measured."""
    from bitfit.model.loading import load_model_shape

    model, _ = load_model_shape(config.model, weights_dtype(config))
    return estimate_peak_memory(model, config, _longest(examples)).peak_bytes


def _longest(examples) -> dict:
    return max((examples[index] for index in range(len(examples))), key=lambda example: (
        len(example["input_ids"]), sum(label != IGNORE_INDEX for label in example["labels"])))


def longest_example(config: TrainConfig, tokenizer, use_data: bool) -> dict:
    """The example the estimate trains on: the longest of config's data (its rows as the run would
    tokenize them), or without data a row of --max-len tokens, every one but the first a label."""
    if not use_data:
        if config.max_len > MOST_TOKENS:
            raise InputError(f"--max-len {config.max_len:,} is more than the estimate takes ({MOST_TOKENS:,} tokens)")
        return build_example([0], [0] * (config.max_len - 1), config.max_len)
    if tokenizer is None:
        raise InputError(f"{config.model} has no tokenizer, which --data needs to measure its rows; "
                         f"leave --data out to estimate a row of --max-len {config.max_len} tokens")
    rows, _ = load_rows_and_format(config.data, config.split, config.limit, config.format)
    examples, _ = tokenize_rows(rows, tokenizer, config.max_len, choose_template(config.template, tokenizer))
    if not examples:
        raise InputError(f"every row of {config.data} was dropped at --max-len {config.max_len}: nothing to train on")
    return _longest(examples)


def _sizes(window: int, micro_batch: int) -> list[int]:
    """The sizes of the window's first two micro-batches (train_step runs them in turn)."""
    first = min(micro_batch, window)
    return [first, min(micro_batch, window - first)] if window > first else [first]


def make_fake(model: torch.nn.Module, device: torch.device) -> None:
    """Give a model on the meta device fake tensors on device, in place; a tensor shared by two
    modules (a head tied to the embeddings) stays one tensor. Call under FakeTensorMode."""
    made = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, meta in table.items():
                if meta is None:
                    continue
                if id(meta) not in made:
                    fake = torch.empty_strided(meta.shape, meta.stride(), dtype=meta.dtype, device=device)
                    if isinstance(meta, torch.nn.Parameter):
                        fake = torch.nn.Parameter(fake, requires_grad=meta.requires_grad)
                    made[id(meta)] = fake
                table[name] = made[id(meta)]


def _label_kinds(live: LiveTensorBytes, model, optimizer) -> None:
    """Say what each tensor is, for the breakdown of the peak: the weights now, the gradients when the
    optimizer starts (every one exists then), its state when it is done."""
    trained = list(trainable_parameters(model).values())
    live.set_kind([*model.parameters(), *model.buffers()], "weights")
    live.set_kind(trained, "trained")

    def before(*_):
        live.set_kind([param.grad for param in trained], "gradients")
        live.phase, live.stage = live.phase.partition(",")[0], "the optimizer step"

    def after(*_):
        live.set_kind([value for state in optimizer.state.values() for value in state.values()
                       if isinstance(value, torch.Tensor)], "optimizer")

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)


def _name_micro_batches(live: LiveTensorBytes, model) -> dict:
    """Tell live which micro-batch of which step runs, and which part of it: each begins with the
    transformer body's forward pass, after which come the head and the loss (bitfit.model.label_loss).
    Returns the count to set "step" in and to zero "micro_batch" in at each step."""
    count = {"step": 0, "micro_batch": 0}

    def body(*_):
        count["micro_batch"] += 1
        live.phase, live.stage = f"step {count['step']}, micro-batch {count['micro_batch']}", "forward"

    def head(*_):
        live.stage = "the head and the loss"

    model.base_model.register_forward_pre_hook(body)
    model.base_model.register_forward_hook(head)
    return count


class _FreshViewConverter(FakeTensorConverter):
    """FakeTensorMode's converter, except that a view is not remembered by the meta tensor it came
    from. The memory holds a weak reference to the view, and torch refuses to swap a tensor that
    one points to, which is how nn.Module.to() and .float() change fake parameters."""

    def from_meta_and_device(self, fake_mode, t, device, pytype=None, dispatch_keys=None):
        return FakeTensor(fake_mode, t, device, pytype=pytype, dispatch_keys=dispatch_keys)


class _BatchValues(TorchDispatchMode):
    """Under FakeTensorMode, keep the batch's values: what a step does can depend on them.

    The batch (token ids, attention mask, labels) is made of real tensors, and an operator on real
    tensors alone runs for real, so the mask of label positions is a real mask. The head runs at those
    positions only (bitfit.model.label_loss): a fake tensor indexed by a real mask is indexed by its
    positions, whose number is known. A number read from a fake tensor (the loss, the gradient norm)
    has no value; 1.0 stands in, which no memory depends on.
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(is_traceable_wrapper_subclass_type(kind) for kind in types):
            return NotImplemented  # a DTensor, a 4-bit weight: it runs the operators on its inner tensors, seen here
        kwargs = kwargs or {}
        tensors = [value for value in tree_flatten((args, kwargs))[0] if isinstance(value, torch.Tensor)]
        if tensors and not any(isinstance(tensor, FakeTensor) or tensor.is_meta for tensor in tensors):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if not tensors:  # made from nothing: a small table of whole numbers is made for real (positions, a mesh)
            out = func(*args, **kwargs)
            if isinstance(out, FakeTensor) and not out.is_floating_point() and out.numel() <= SMALL_TABLE:
                with unset_fake_temporarily():
                    return func(*args, **kwargs)
            return out
        if func is torch.ops.aten._local_scalar_dense.default:
            return 1.0
        if func is torch.ops.aten.index.Tensor:
            args = (args[0], [position for index in args[1] for position in _positions(index)], *args[2:])
        return func(*args, **kwargs)


def _positions(index):
    """A real boolean mask as the index tensors of its True positions (what indexing by it means)."""
    if index is None or isinstance(index, FakeTensor) or index.dtype != torch.bool:
        return [index]
    with unset_fake_temporarily():
        return list(index.nonzero().unbind(1))


@contextlib.contextmanager
def _ranks(config: TrainConfig, ranks: int, live: LiveTensorBytes):
    """--fsdp: the world of rank 0 of ranks, whose collectives do nothing (torch's fake process group:
    each rank's memory is the same, and no other rank runs).

    FSDP's parameters are DTensors, and a DTensor works out the global shape of an operator's output
    by running it on fake tensors, once per operator and layout; it takes the estimate's fake mode for
    that, and those tensors stand for no memory. It runs them under ShardingPropagator._fake_mode_lock
    (a lock for threaded tests, nothing by default), so that is where live stops counting."""
    if not config.fsdp:
        yield SINGLE
        return
    if ranks < 2:
        raise InputError(f"--fsdp shards the model over 2 or more ranks; got {ranks}")
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    from bitfit.parallel.torchrun import TorchrunWorld

    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    lock, ShardingPropagator._fake_mode_lock = ShardingPropagator._fake_mode_lock, live.not_counted()
    try:
        yield TorchrunWorld(rank=0, world_size=ranks, local_rank=0)
    finally:
        ShardingPropagator._fake_mode_lock = lock
        dist.destroy_process_group()


@contextlib.contextmanager
def _data_dependent_model_errors(model_name: str):
    """A model whose forward pass depends on values the estimate does not have is one line."""
    from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException

    try:
        yield
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        raise InputError(f"cannot estimate {model_name}: its forward pass depends on the values of its "
                         f"weights ({error.func}), which an estimate does not have") from None


def format_estimates(estimates: dict[str, MemoryEstimate], chosen: str, title: str) -> str:
    """The estimates as a table, the chosen mode's column first, then where each peak falls."""
    from bitfit.store.metrics import readable_bytes

    modes = [chosen, *(mode for mode in estimates if mode != chosen)]
    first = estimates[chosen]
    rows = [("", [f"{mode}{' (this run)' if mode == chosen else ''}" for mode in modes]),
            ("trainable parameters", [f"{estimates[mode].trainable_params:,}" for mode in modes])]
    for label, field in (("weights and buffers", "weights_bytes"), ("  of which trained", "trained_bytes"),
                         ("gradients", "gradient_bytes"), ("optimizer state", "optimizer_bytes"),
                         ("everything else", "other_bytes"), ("peak (max_memory_allocated)", "peak_bytes"),
                         (f"rule of thumb ({RULE_OF_THUMB_BYTES} B a parameter)", "rule_of_thumb_bytes")):
        rows.append((label, [readable_bytes(getattr(estimates[mode], field)) for mode in modes]))
    width = max(len(label) for label, _ in rows)
    columns = [max(len(row[1][index]) for row in rows) for index in range(len(modes))]
    lines = [title, f"the longest window: micro-batches of {first.micro_batch} x {first.tokens} tokens "
                    f"({first.labels} labels each); at the peak:"]
    lines += [f"{label:<{width}}  " + "  ".join(f"{value:>{columns[index]}}" for index, value in enumerate(values))
              for label, values in rows]
    lines += [f"{mode}'s peak: {estimates[mode].where}" for mode in modes]
    return "\n".join(lines)
