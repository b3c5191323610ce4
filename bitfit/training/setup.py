"""Setting a model up to train: the same steps, in the same order, for every caller (the run, the bench).

    freeze                     what trains: in BitFit the chosen biases (added first with --add-biases)
    place_on_device            where it lives; the frozen weights in 4 bits with --quantize nf4
    set_precision_and_kernels  how it computes: fp32 where precision matters, faster kernels that agree
    shard_model                --fsdp only: each rank keeps its shards of every parameter
    build_optimizer            what updates it: AdamW over the trained tensors alone

setup_model takes them in turn and returns a Setup: what train_loop needs besides the model and the
data (the optimizer, and the options it passes to train_step: world, loss function, loss scaling).
"""

import dataclasses

import torch

from bitfit.config import TrainConfig
from bitfit.core.trainable import build_optimizer, count_parameters, describe_counts, trainable_parameters
from bitfit.core.world import SINGLE, World
from bitfit.model.added_biases import add_biases
from bitfit.model.bias_terms import describe_bias_terms, mask_gradients, partly_trained, select_trainable
from bitfit.model.compute import (
    fuse_tanh_gelu,
    keep_norms_in_fp32,
    loss_scaling,
    prefer_eager_attention_on_cpu,
    weights_dtype,
)
from bitfit.model.label_loss import label_loss_sum
from bitfit.model.quantize import describe_quantized, quantize_frozen_weights
from bitfit.parallel.fsdp import ShardedWorld, describe_4bit_shards, shard_model
from bitfit.store.metrics import weight_bytes


@dataclasses.dataclass
class Setup:
    trained_names: list[str]  # the tensors that train: what the delta holds
    masks: dict[str, torch.Tensor]  # the partly trained tensors (a slice of a fused bias): which entries train
    optimizer: torch.optim.Optimizer
    world: World  # the processes: under --fsdp, one whose calls reach FSDP
    loss_fn: object  # what train_step computes the loss with (bitfit.model.label_loss)
    scaler: object  # fp16's loss scaling, or none (bitfit.model.compute.loss_scaling)
    trainable: int  # numbers that train (a fused bias counts only its trained slice)
    total: int  # numbers in the model
    weight_bytes: int  # the whole model's weights and buffers, before --fsdp shards them


def setup_model(model, config: TrainConfig, device: torch.device, world: World = SINGLE, log=print,
                on_whole_model=None) -> Setup:
    """Take the setup steps in order. on_whole_model(model, trained_names), if given, is called while
    every rank still holds the whole model, before --fsdp shards it (a run reads what its delta records
    of the base there)."""
    trained_names, masks = freeze(model, config)
    place_on_device(model, config, device)
    if config.quantize:
        log(describe_quantized(model))
    set_precision_and_kernels(model, config, device)
    whole_weight_bytes = weight_bytes(model)
    if on_whole_model is not None:
        on_whole_model(model, trained_names)
    if config.fsdp:
        if config.quantize:
            log(describe_4bit_shards(model, world.world_size))
        shard_model(model, config, device, masks)
        world = ShardedWorld.of(world)
    optimizer = build_optimizer(model, config, device, no_decay=masks)
    if config.mode == "bitfit":
        log(describe_bias_terms(model, config.bias_terms))
    trainable, total = count_parameters(model, masks)
    log(describe_counts(trainable, total))
    return Setup(trained_names=trained_names, masks=masks, optimizer=optimizer, world=world, loss_fn=label_loss_sum,
                 scaler=loss_scaling(config.dtype, device), trainable=trainable, total=total,
                 weight_bytes=whole_weight_bytes)


def freeze(model, config: TrainConfig) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Step 1, what trains: in BitFit the chosen biases, everything in full mode. Returns the
    names of the trained tensors and the masks of those of which only a slice trains.
    """
    if config.add_biases:
        # Zero biases change no output, so training starts from the base model exactly; they are
        # marked as added, which the delta records so that loading can create them again.
        add_biases(model, config.bias_terms)
    trained_names = select_trainable(model, config.mode, config.bias_terms)
    # A fused q,k,v bias of which only a slice is chosen (--bias-terms query on GPT-2, say)
    # trains through a gradient mask.
    masks = partly_trained(model, config.bias_terms) if config.mode == "bitfit" else {}
    mask_gradients(model, masks)
    return trained_names, masks


def place_on_device(model, config: TrainConfig, device: torch.device) -> None:
    """Step 2, where it lives: the model moves to its device. With --quantize nf4 the frozen
    weights go first, one layer at a time, each turned into 4 bits there: BitFit never updates a
    weight, so it can be held in 4 bits, and the device never holds the whole unquantized model
    (a 7B model in bf16 would not fit where its 4-bit copy does)."""
    if config.quantize:
        # --fsdp: quantized on the device, then kept on the CPU with the rest of the model, from which
        # shard_model takes each rank's shards: no GPU holds the whole 4-bit model.
        quantize_frozen_weights(model, device, keep_on=torch.device("cpu") if config.fsdp else None)
    if not config.fsdp:  # --fsdp: shard_model moves each rank's shards there, never the whole model
        model.to(device)


def set_precision_and_kernels(model, config: TrainConfig, device: torch.device) -> None:
    """Step 3, how it computes: fp32 where precision matters, faster kernels where they give the
    same numbers, and the memory options. Each is explained where it is defined."""
    fuse_tanh_gelu(model)
    if weights_dtype(config) != torch.float32:
        keep_norms_in_fp32(model)
    with torch.no_grad():
        for param in trainable_parameters(model).values():
            # fp32 master copies of whatever trains (bf16 would round small updates away).
            param.data = param.data.float()
    if config.grad_checkpointing:
        # Non-reentrant checkpointing works even though the inputs (frozen embeddings in
        # BitFit) do not require grad.
        enable = getattr(model, "activation_checkpointing_enable", None)  # the name from transformers 5.2x
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    prefer_eager_attention_on_cpu(model, device)
    if config.compile:
        model.base_model.compile()  # in place, so parameter names (and deltas) stay the same
