"""Models larger than one GPU (--fsdp): every rank holds a shard of every parameter, with FSDP2.

Plain torchrun (bitfit.parallel.torchrun) gives every rank the whole model, which scales throughput,
not model size. With --fsdp, torch's fully_shard splits each parameter over the N ranks: a rank
keeps 1/N of it, gathers a layer's full weights just before the layer runs and frees them after.
In BitFit the frozen weights are nearly all the memory, and they are what sharding saves; the bias
gradients are reduce-scattered (summed, each rank receiving its shard's part). In full mode the
weights, their gradients and AdamW's moments are all sharded.

The arithmetic is bitfit's, exactly as in one process:
- The loss of each rank is already divided by the label tokens of the whole global window, so
  the ranks' gradients must be summed. FSDP averages them by default: shard_model sets it to sum.
- FSDP reduces in every backward pass; train_step turns that on for the last micro-batch of the
  window only (ShardedWorld.sync_gradients_in_backward), so gradients cross the wire once per step.
- clip_grad_norm_ over the sharded gradients measures all the ranks' shards: the global norm.
- Every rank runs every micro-batch (ShardedWorld.fill_window adds idle_micro_batch where a rank
  has fewer), since each layer's gather needs all of them.

With --quantize nf4 the 4-bit weights are sharded too: each rank keeps its rows' 4-bit codes and
scales, FSDP gathers those, and torchao rebuilds the 4-bit weight from them (NF4Tensor's
fsdp_post_all_gather), which the layer dequantizes as in one process. torchao splits them by rows
without padding, so a weight whose rows or groups of scales do not divide by N stays whole on
every rank (FSDP's ignored_params): the run works on any number of ranks, and holds that weight
N times. Real models' layers split over 2, 4 or 8 ranks.

Saving gathers what is written (the biases, or in full mode the whole model on rank 0 only);
resuming saves and loads the sharded state with torch.distributed.checkpoint (bitfit.store.checkpoint).

FSDP's modules are imported inside the functions that need them, and only in a process group:
importing them takes half a second, which a run in one process never pays.
"""

import dataclasses
import math
import warnings

import torch
import torch.distributed as dist

from bitfit.core.examples import IGNORE_INDEX, collate
from bitfit.errors import InputError
from bitfit.model.bias_terms import mask_gradients
from bitfit.model.quantize import NF4Linear, splits_evenly
from bitfit.parallel.torchrun import TorchrunWorld
from bitfit.store.delta import BIAS_FILE, write_bias_delta
from bitfit.store.files import save_model_folder


@dataclasses.dataclass(frozen=True)
class ShardedWorld(TorchrunWorld):
    """Several processes under --fsdp, each with a shard of every parameter (the model, once shard_model ran)."""

    @classmethod
    def of(cls, world: TorchrunWorld) -> "ShardedWorld":
        return cls(rank=world.rank, world_size=world.world_size, local_rank=world.local_rank)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Nothing: FSDP summed the shards' gradients in the window's last backward pass."""

    def sync_gradients_in_backward(self, model, sync: bool) -> None:
        """Whether the next backward pass reduce-scatters the gradients (the window's last micro-batch)
        or only accumulates them on each rank."""
        model.set_requires_gradient_sync(sync)

    def fill_window(self, batches: list[dict], window_length: int, pad_id: int) -> list[dict]:
        """Every rank runs every micro-batch of the window: FSDP's gathers need them all."""
        return batches + [idle_micro_batch(pad_id)] * (window_length - len(batches))

    def free_gathered_weights(self, model) -> None:
        """Free the top-level weights (embeddings, final norm, head) that forward passes left gathered.
        FSDP keeps them until the backward pass, which an evaluation never runs; between steps each
        rank must hold only its shards (train_step clips and the optimizer steps those)."""
        model.reshard()


def check_world(config, world) -> None:
    """--fsdp shards over the processes torchrun starts: refuse it with none to shard over."""
    if config.fsdp and world.world_size == 1:
        raise InputError("--fsdp shards the model over several processes: start it with torchrun "
                         "--nproc_per_node N (N > 1); in one process, leave --fsdp out")


def shard_model(model, config, device: torch.device, masks: dict[str, torch.Tensor]) -> None:
    """The setup step of --fsdp, after freeze and set_precision_and_kernels and before
    build_optimizer: fully_shard each transformer block, then the whole model, which takes
    what is left (embeddings, final norm, head). Each rank's shards move to device; 4-bit
    weights that do not split evenly stay whole (whole_4bit_weights)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy = precision_policy(config)
    whole = whole_4bit_weights(model, mesh.size(), device)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=set(whole.values()))
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=set(whole.values()))
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # Sum the ranks' gradients, as TorchrunWorld.sum_gradients does: a plain SUM
            # with nothing to divide by (factor 1; NCCL's PREMUL_SUM, which FSDP would use for a
            # factor of its own, does not exist in gloo).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    # bitfit's loss calls model.base_model and then applies the head itself, at label positions only
    # (bitfit.model.label_loss); FSDP gathers the weights held at the top (embeddings, final norm,
    # head) around model.forward, which that never calls. Registered as a forward method of the model, the base
    # model's call gets the same: gathered before, and the backward pass starting from its output.
    model.base_model_forward = model.base_model.__call__
    register_fsdp_forward_method(model, "base_model_forward")
    # FSDP warns that the base model's output is a view (GPT-2's is), since an in-place change to a
    # view would skip its backward hook; bitfit's loss changes nothing in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # The gradient masks of partly trained biases went with the unsharded parameters: mask each
    # shard with its part of the mask (src_data_rank=None: every rank has the whole mask to cut).
    params = dict(model.named_parameters())
    mask_gradients(model, {name: distribute_tensor(mask, mesh, params[name].placements, src_data_rank=None)
                           for name, mask in masks.items()})


def whole_4bit_weights(model, ranks: int, device: torch.device) -> dict[str, torch.nn.Parameter]:
    """--quantize nf4: the 4-bit weights that do not split evenly over the ranks
    (bitfit.model.quantize.splits_evenly), by name, each moved whole to device.

    FSDP leaves them out (ignored_params): it neither moves them, nor gathers them, nor reduces
    their gradient, which a frozen weight never has; each rank uses its whole copy as a run in one
    process does. Refusing them instead would stop runs that work, to save memory the user can see
    (the run names them, and parameter_bytes_per_rank counts them on every rank)."""
    whole = {}
    for path, module in model.named_modules():
        if isinstance(module, NF4Linear) and not splits_evenly(module.weight, ranks):
            module.weight = torch.nn.Parameter(module.weight.to(device), requires_grad=False)
            whole[f"{path}.weight"] = module.weight
    return whole


def describe_4bit_shards(model, ranks: int) -> str:
    """One line, before shard_model: whether each 4-bit weight is sharded over the ranks, those that
    stay whole by shape (rows x columns, groups of scales), and the numbers of ranks that would shard them all."""
    weights = {f"{path}.weight": module.weight for path, module in model.named_modules()
               if isinstance(module, NF4Linear)}
    whole = [name for name, weight in weights.items() if not splits_evenly(weight, ranks)]
    if not whole:
        return f"--fsdp: each of the {len(weights)} weights held in 4 bits is sharded over the {ranks} ranks"
    by_shape = {}
    for name in whole:
        by_shape.setdefault((*weights[name].shape, weights[name].quantization_factor.numel()), []).append(name)
    shapes = ", ".join(f"{len(names)} of {rows} x {columns} in {groups} group{'s' * (groups > 1)} "
                       f"({names[0]}{', ...' * (len(names) > 1)})"
                       for (rows, columns, groups), names in by_shape.items())
    # Every 4-bit weight splits over a number of ranks that divides all their rows and groups.
    common = math.gcd(*(count for weight in weights.values()
                        for count in (weight.size(0), weight.quantization_factor.numel())))
    counts = [str(count) for count in range(2, min(common, 64) + 1) if common % count == 0]
    would = f"all would shard over {' or '.join(counts)} ranks" if counts else "no number of ranks shards them all"
    return (f"--fsdp: {len(whole)} of the {len(weights)} weights held in 4 bits stay whole on every rank, their "
            f"rows or groups of scales not dividing by {ranks}: {shapes}; {would}")


def precision_policy(config):
    """How FSDP gathers, computes and reduces: the dtypes of bitfit's own --dtype, in its terms."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if config.dtype == "fp32":
        return MixedPrecisionPolicy()
    if config.mode == "bitfit":
        # The frozen weights are stored in bf16 already and the biases in fp32 (weights_dtype, bitfit.model.compute):
        # gathered as they are stored, computed under autocast as in one process, reduced in fp32. (No
        # param_dtype, which torchao's 4-bit weights would ignore: they are gathered as 4-bit storage.)
        return MixedPrecisionPolicy(reduce_dtype=torch.float32)
    # Full fine-tuning keeps fp32 master weights (sharded) and gathers bf16 copies of them for
    # the forward and backward passes; gradients are reduced, and accumulated, in fp32.
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def transformer_blocks(model) -> list[torch.nn.Module]:
    """The repeated layers, which Hugging Face models name in _no_split_modules (GPT2Block, LlamaDecoderLayer)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise InputError(f"--fsdp: this {type(model).__name__} does not name its transformer blocks "
                         f"(_no_split_modules), so bitfit cannot shard it layer by layer")
    return blocks


def idle_micro_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch that changes nothing: one token and no label, so its loss and gradient are
    zero. Under --fsdp a rank whose share of a window holds fewer micro-batches than the others'
    runs these in their place: every rank must take part in every layer's gather and reduction."""
    return collate([{"input_ids": [pad_id], "labels": [IGNORE_INDEX]}], pad_id)


def save_gathered(model, config, output_dir, trained_names: list[str], delta_metadata: dict[str, str],
                  tokenizer, world) -> None:
    """Under --fsdp, write what a run in one process writes: every rank takes part in gathering
    the shards, rank 0 writes. BitFit's delta gathers only the biases; full mode's model folder
    gathers the whole model into rank 0's CPU memory."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if config.mode == "bitfit":
        params = dict(model.named_parameters())
        biases = {name: params[name].full_tensor().cpu() for name in trained_names}
        if world.is_main:
            write_bias_delta(output_dir / BIAS_FILE, biases, delta_metadata)
        return
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        # Tied weights (GPT-2's head is its embedding) are gathered as two copies: make them one
        # tensor again, so that save_pretrained writes it once, as it does in one process.
        first_name = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            weights[name] = weights[first_name.setdefault(id(param), name)]
        save_model_folder(output_dir / "model", model, tokenizer, state_dict=weights)
