"""A training run from settings to files: load, freeze, place, set precisions, build the optimizer, loop, save.

Everything that can be wrong with the user's input (flags, output folder, data, the model's
position limit) is checked before the model loads, and the run writes into a staging folder
that replaces the run folder only once it has succeeded (bitfit.rundir), so a failed run never
changes an earlier run's files.

The model's setup is four steps that run() calls in order, each a function below: freeze
(what trains), place_on_device (where it lives; 4-bit weights with --quantize), set_precision_and_kernels
(how it computes), build_optimizer (what updates it). With --fsdp, bitfit.fsdp.shard_model comes
before the last: each rank keeps its shards of every parameter.
"""

import dataclasses
import platform
import textwrap

import torch

from bitfit.bias import (add_biases, count_parameters, describe_bias_terms, describe_counts, mask_gradients,
                         partly_trained, select_trainable, trainable_parameters)
from bitfit.checkpoint import (BIAS_FILE, base_fingerprint, bias_delta_metadata, save_bias_delta, save_json,
                               save_model_folder)
from bitfit.config import TrainConfig
from bitfit.chat import chat_template_hash, choose_template
from bitfit.data import load_rows_and_format, rows_fingerprint, split_rows, tokenize_rows
from bitfit.formats import has_answer
from bitfit.distributed import SINGLE, gather_objects
from bitfit.errors import InputError, Interrupted
from bitfit.fsdp import check_world, describe_4bit_shards, save_gathered, shard_model
from bitfit.loop import count_optimizer_steps, new_progress, train_loop
from bitfit.metrics import (MetricsLog, format_summary, parameter_bytes, peak_memory_bytes, peak_rss_bytes,
                            perplexity, reset_peak_memory, weight_bytes, work_done)
from bitfit.model import (fuse_tanh_gelu, keep_norms_in_fp32, load_model_and_tokenizer, pad_token_id,
                          position_limit, prefer_eager_attention_on_cpu, resolve_device, weights_dtype)
from bitfit.quantize import describe_quantized, quantize_frozen_weights
from bitfit.resume import refuse_changed_inputs, restore_training_state
from bitfit.rundir import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, RunFolder


def run(config: TrainConfig, resume_state: dict | None = None, log=print, world=SINGLE,
        overwrite: bool = False) -> dict:
    """Train as config says (continuing from resume_state if given), write the run folder,
    and return the summary.

    A run folder that holds a run is replaced only with overwrite (or continued with resume_state).
    Under torchrun (world from bitfit.distributed.setup) every rank calls this; only rank 0
    logs and writes files.
    """
    check_world(config, world)
    device = resolve_device(config.device)
    if device.type == "cuda" and world.world_size > 1:
        device = torch.device("cuda", world.local_rank)
    if not world.is_main:
        log = lambda message: None  # noqa: E731
    with RunFolder(config.output_dir, writer=world.is_main, log=log) as folder:
        folder.open(overwrite=overwrite, resuming=resume_state is not None)
        rows, data_format = load_rows_and_format(config.data, config.split, config.limit, config.format)
        fingerprints = {"data": rows_fingerprint(rows)}
        if resume_state is not None:
            refuse_changed_inputs(resume_state["progress"], fingerprints, config.output_dir)
        config = fit_max_len_to_model(config, log)
        train_rows, eval_rows = split_rows(rows, config.eval_size, config.seed)
        # Both modes start from the same fresh pretrained weights: never chain one mode's result
        # into the other, or the comparison measures the chain rather than the method.
        model, tokenizer = load_model_and_tokenizer(config.model, weights_dtype(config))
        fingerprints["base"] = base_fingerprint(model, ())  # every weight, before any trains
        if resume_state is not None:
            refuse_changed_inputs(resume_state["progress"], fingerprints, config.output_dir)
        # The data and prompt formats as resolved, so that train_config.json says what ran.
        config = dataclasses.replace(config, format=data_format, template=choose_template(config.template, tokenizer))
        examples, eval_examples, dropped = examples_to_train_on(train_rows, eval_rows, tokenizer, config)
        log(textwrap.fill("settings: " + "  ".join(f"{key}={value}" for key, value in config.to_dict().items()),
                          width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False))
        if dropped:
            log(describe_dropped(rows, dropped, config.max_len))

        # Dropout (each rank its own masks); the data order has its own seeded generator.
        torch.manual_seed(config.seed + world.rank)
        trained_names, masks = freeze(model, config)
        place_on_device(model, config, device)
        if config.quantize:
            log(describe_quantized(model))
        set_precision_and_kernels(model, config, device)
        model_bytes = weight_bytes(model)  # the whole model's, before --fsdp shards it
        delta_metadata = None
        if config.fsdp:
            # A delta records its base's class and a fingerprint of its weights: read them while whole.
            delta_metadata = bias_delta_metadata(model, trained_names, config.model, quantized_base=config.quantize,
                                                 template=config.template,
                                                 chat_template_hash=template_hash(tokenizer, config))
            if config.quantize:
                log(describe_4bit_shards(model, world.world_size))
            shard_model(model, config, device, masks)
        parameter_bytes_here = parameter_bytes(model)  # under --fsdp, this rank's shards
        optimizer = build_optimizer(model, config, device, no_decay=masks)
        if config.mode == "bitfit":
            log(describe_bias_terms(model, config.bias_terms))
        trainable, total = count_parameters(model, masks)  # a fused bias counts only its trained slice
        log(describe_counts(trainable, total))
        progress = {**new_progress(), "fingerprints": fingerprints}
        if resume_state is not None:
            progress = {**restore_training_state(resume_state, model, optimizer), "fingerprints": fingerprints}
            total_steps = count_optimizer_steps(len(examples), config, world.world_size)
            if progress["step"] >= total_steps:
                raise InputError(f"the run in {config.output_dir} already reached step {progress['step']} "
                                 f"of {total_steps}; pass a larger --max-steps or --epochs to extend it")
            log(f"resuming at optimizer step {progress['step']} of {total_steps}")

        staging = folder.stage(resuming=resume_state is not None)
        metrics_log = None
        if world.is_main:
            save_json(staging / CONFIG_FILE, config.to_dict())
            metrics_log = MetricsLog(staging / METRICS_FILE,
                                     keep_through_step=progress["step"] if resume_state is not None else None)
        reset_peak_memory(device)
        try:
            progress = train_loop(model, optimizer, examples, config, pad_id=pad_token_id(tokenizer),
                                  device=device, metrics_log=metrics_log, eval_examples=eval_examples,
                                  progress=progress, world=world, checkpoint_dir=staging)
        except Interrupted:
            # A deliberate stop keeps the run so far: its settings, metrics and checkpoint. (The
            # metrics file is flushed line by line; it stays open across the rename, as Linux allows.)
            folder.commit()
            raise
        finally:
            if metrics_log is not None:
                metrics_log.close()

        peak_memory_per_rank = gather_objects(peak_memory_bytes(device))
        summary = build_summary(config, progress, trainable=trainable, total=total, device=device,
                                dropped_rows=dropped, eval_rows=len(eval_examples),
                                world_size=world.world_size, peak_memory_per_rank=peak_memory_per_rank,
                                weight_bytes=model_bytes,
                                parameter_bytes_per_rank=gather_objects(parameter_bytes_here))
        save_trained(model, tokenizer, config, staging, trained_names, world, delta_metadata)
        if world.is_main:
            save_json(staging / SUMMARY_FILE, summary)
            folder.commit()
    log(format_summary(summary))
    return summary


def examples_to_train_on(train_rows: list[dict], eval_rows: list[dict], tokenizer, config: TrainConfig):
    """(training examples, held-out examples, rows dropped): tokenized as the steps read them. Data that
    leaves nothing to train on is refused here, before the run folder is touched."""
    examples, dropped = tokenize_rows(train_rows, tokenizer, config.max_len, config.template)
    eval_examples, eval_dropped = tokenize_rows(eval_rows, tokenizer, config.max_len, config.template)
    if not any(has_answer(row) for row in train_rows):
        raise InputError(f"none of the {len(train_rows)} training rows has an assistant turn: there is nothing "
                         f"to train on")
    if not examples:
        raise InputError(f"every one of the {len(train_rows)} training rows was dropped: no response "
                         f"token fits in --max-len {config.max_len}; raise --max-len")
    if eval_rows and not eval_examples:
        raise InputError(f"every one of the {len(eval_rows)} held-out rows was dropped by --max-len "
                         f"{config.max_len}; raise --max-len or --eval-size")
    return examples, eval_examples, dropped + eval_dropped


def describe_dropped(rows: list[dict], dropped: int, max_len: int) -> str:
    unanswered = sum(not has_answer(row) for row in rows)
    too_long = dropped - unanswered
    reasons = ([f"{unanswered} have no assistant turn"] if unanswered else []) + (
        [f"{too_long} had their response cut away by --max-len {max_len}"] if too_long else [])
    return f"dropped {dropped} of {len(rows)} rows: {'; '.join(reasons)}"


def save_trained(model, tokenizer, config: TrainConfig, staging, trained_names, world, delta_metadata=None) -> None:
    """Write what the run trained into the staging folder: BitFit's delta, or full mode's model folder."""
    if config.fsdp:  # every rank takes part in gathering the shards; rank 0 writes
        save_gathered(model, config, staging, trained_names, delta_metadata, tokenizer, world)
    elif not world.is_main:
        return  # every rank holds the same trained tensors: rank 0's are written
    elif config.mode == "bitfit":
        save_bias_delta(staging / BIAS_FILE, model, trained_names, base_model=config.model,
                        quantized_base=config.quantize, template=config.template,
                        chat_template_hash=template_hash(tokenizer, config))
    else:
        save_model_folder(staging / "model", model, tokenizer)


def template_hash(tokenizer, config: TrainConfig) -> str | None:
    """What a delta records of the chat template it was trained through (bitfit.chat)."""
    return chat_template_hash(tokenizer) if config.template == "chat" else None


def fit_max_len_to_model(config: TrainConfig, log=print) -> TrainConfig:
    """Cap --max-len at the model's position limit, read from its config before the model loads.

    Longer examples would index past the position table (an IndexError mid-run); capping says so
    and trains, as cutting at --max-len does anyway.
    """
    limit = position_limit(config.model)
    if limit is None or config.max_len <= limit:
        return config
    log(f"--max-len {config.max_len} is more than the {limit} positions of {config.model}: examples are cut "
        f"at {limit}")
    return dataclasses.replace(config, max_len=limit)


def build_summary(config, progress, *, trainable, total, device, dropped_rows, eval_rows, world_size=1,
                  peak_memory_per_rank=None, weight_bytes=None, parameter_bytes_per_rank=None) -> dict:
    """The run's summary; progress's counts are already global (summed over the ranks)."""
    if peak_memory_per_rank is None:
        peak_memory_per_rank = [peak_memory_bytes(device)]
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
        "peak_memory_bytes": None if None in peak_memory_per_rank else max(peak_memory_per_rank),
        "peak_memory_bytes_per_rank": peak_memory_per_rank,
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


# ------------------------------------------------------------- setting up the model, in order


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
    if not config.fsdp:  # --fsdp: bitfit.fsdp.shard_model moves each rank's shards there, never the whole model
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


def build_optimizer(model, config: TrainConfig, device=torch.device("cpu"), no_decay=()) -> torch.optim.Optimizer:
    """Step 4, what updates it: AdamW over the trainable tensors only."""
    # The optimizer only ever sees the trainable tensors: in BitFit, AdamW's two moment
    # buffers are then as small as the biases themselves, one of BitFit's memory savings.
    # The fused CUDA kernel updates all tensors in one launch instead of several per tensor.
    # AdamW's decoupled weight decay shrinks every entry of a tensor, gradient or not, so it
    # would move the masked-out slice of a partly trained tensor (no_decay): those get none,
    # which keeps that slice bit-identical to the base without restoring it after every step
    # (their trained slice goes undecayed too; with the default --weight-decay 0 nothing differs).
    named = trainable_parameters(model).items()
    groups = [{"params": [param for name, param in named if name not in no_decay]},
              {"params": [param for name, param in named if name in no_decay], "weight_decay": 0.0}]
    return torch.optim.AdamW([group for group in groups if group["params"]], lr=config.lr,
                             weight_decay=config.weight_decay, fused=device.type == "cuda")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
