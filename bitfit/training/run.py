"""A training run from settings to files, as train.py makes it: read, load, set up, train, save.

Everything that can be wrong with the user's input (flags, output folder, data, the model's
position limit) is checked before the model loads, and the run writes into a staging folder
that replaces the run folder only once it has succeeded (bitfit.store.run_folder), so a failed run
never changes an earlier run's files.

The default path, top to bottom: run -> read_inputs (rows, model, examples) -> setup_model (the
setup steps, bitfit.training.setup) -> train_loop (bitfit.core.loop) -> train_step -> the loss.
"""

import dataclasses
import textwrap

import torch
from tqdm import tqdm

from bitfit.config import TrainConfig
from bitfit.core.loop import count_optimizer_steps, new_progress, train_loop
from bitfit.core.world import SINGLE
from bitfit.data.rows import load_rows_and_format, rows_fingerprint, split_rows
from bitfit.data.templates import chat_template_hash, choose_template
from bitfit.data.tokenize import tokenize_rows
from bitfit.errors import InputError, Interrupted
from bitfit.model.compute import resolve_device, weights_dtype
from bitfit.model.fingerprint import base_fingerprint
from bitfit.model.loading import load_model_and_tokenizer, pad_token_id, position_limit
from bitfit.parallel.fsdp import check_world, save_gathered
from bitfit.store.checkpoint import StopOnCtrlC, refuse_changed_inputs, restore_training_state, save_checkpoint_if_due
from bitfit.store.delta import BIAS_FILE, bias_delta_metadata, write_bias_delta
from bitfit.store.files import save_json, save_model_folder
from bitfit.store.metrics import (MetricsLog, format_summary, import_summary_writer, parameter_bytes, peak_memory_bytes,
                                  reset_peak_memory)
from bitfit.store.run_folder import CONFIG_FILE, METRICS_FILE, SUMMARY_FILE, TENSORBOARD_DIR, RunFolder
from bitfit.training.micro_batch import TryEachSize, micro_batches
from bitfit.training.estimate import estimate_run
from bitfit.training.setup import setup_model
from bitfit.training.summary import build_summary


@dataclasses.dataclass
class Inputs:
    """What a run reads before it sets anything up."""
    model: torch.nn.Module
    tokenizer: object
    examples: object  # bitfit.data.tokenize.LazyExamples
    eval_examples: object
    rows: int  # rows read
    dropped: dict  # reason -> rows dropped for it
    fingerprints: dict  # of the data and the base, which a resumed run checks


def run(config: TrainConfig, resume_state: dict | None = None, log=print, world=SINGLE,
        overwrite: bool = False) -> dict:
    """Train as config says (continuing from resume_state if given), write the run folder,
    and return the summary.

    A run folder that holds a run is replaced only with overwrite (or continued with resume_state).
    Under torchrun (world from bitfit.parallel.torchrun.setup) every rank calls this; only rank 0
    logs and writes files.
    """
    check_world(config, world)
    if config.report_to == "tensorboard":
        import_summary_writer()  # a missing package is one line, before anything is touched
    device = resolve_device(config.device)
    if device.type == "cuda" and world.world_size > 1:
        device = torch.device("cuda", world.local_rank)
    if not world.is_main:
        log = lambda message: None  # noqa: E731
    resuming = resume_state is not None
    with RunFolder(config.output_dir, writer=world.is_main, log=log) as folder:
        folder.open(overwrite=overwrite, resuming=resuming)
        config, inputs = read_inputs(config, resume_state, log)
        log(textwrap.fill("settings: " + "  ".join(f"{key}={value}" for key, value in config.to_dict().items()),
                          width=100, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False))
        if inputs.dropped:
            log(describe_dropped(inputs.rows, inputs.dropped))

        # On a GPU, what the estimate (python -m bitfit.estimate) says the run will take, to set beside what
        # it takes. Not under --fsdp: the estimate needs a process group of its own (run it before, with --fsdp N).
        estimated_peak = (estimate_run(config, inputs.examples)
                          if device.type == "cuda" and not config.fsdp and world.is_main else None)
        # Dropout's random draws (each rank its own masks); the data order has its own seeded generator.
        torch.manual_seed(config.seed + world.rank)
        delta_metadata = {}  # what the delta records of the base, read while the model is whole
        record_base = (lambda model, names: delta_metadata.update(
            bias_delta_metadata(model, names, config.model, quantized_base=config.quantize, template=config.template,
                                chat_template_hash=template_hash(inputs.tokenizer, config))))
        setup = setup_model(inputs.model, config, device, world, log,
                            on_whole_model=record_base if config.mode == "bitfit" else None)
        progress = {**new_progress(), "fingerprints": inputs.fingerprints}
        if resuming:
            progress = resume_progress(resume_state, inputs, setup, config, log)

        staging = folder.stage(resuming=resuming)
        try:
            progress = train(inputs, setup, config, progress, staging, device, log, keep_metrics_through=(
                progress["step"] if resuming else None))
        except Interrupted:
            # A deliberate stop keeps the run so far: its settings, metrics and checkpoint.
            folder.commit()
            raise

        summary = build_summary(config, progress, trainable=setup.trainable, total=setup.total, device=device,
                                dropped_rows=sum(inputs.dropped.values()), eval_rows=len(inputs.eval_examples),
                                world_size=world.world_size,
                                peak_memory_per_rank=setup.world.gather(peak_memory_bytes(device)),
                                weight_bytes=setup.weight_bytes,
                                parameter_bytes_per_rank=setup.world.gather(parameter_bytes(inputs.model)),
                                estimated_peak_memory_bytes=estimated_peak)
        save_trained(inputs.model, inputs.tokenizer, config, staging, setup, delta_metadata)
        if world.is_main:
            save_json(staging / SUMMARY_FILE, summary)
            folder.commit()
    log(format_summary(summary))
    return summary


def read_inputs(config: TrainConfig, resume_state: dict | None, log) -> tuple[TrainConfig, Inputs]:
    """The rows, the model and the examples, each checked as soon as it is read (a resumed run's data
    before the model loads, its base right after); config comes back with the data format, the
    template and --max-len as resolved, so that train_config.json says what ran."""
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
    config = dataclasses.replace(config, format=data_format, template=choose_template(config.template, tokenizer))
    if config.template == "chat":  # the prompts' tokens depend on its text: a resumed run keeps it
        fingerprints["chat_template"] = chat_template_hash(tokenizer)
        if resume_state is not None:
            refuse_changed_inputs(resume_state["progress"], fingerprints, config.output_dir)
    examples, _ = tokenize_rows(train_rows, tokenizer, config.max_len, config.template)
    eval_examples, _ = tokenize_rows(eval_rows, tokenizer, config.max_len, config.template)
    if not examples:
        reasons = "; ".join(f"{count} {reason}" for reason, count in examples.dropped.items())
        raise InputError(f"every one of the {len(train_rows)} training rows was dropped ({reasons}): there is "
                         f"nothing to train on" + ("; raise --max-len" if "--max-len" in reasons else ""))
    if eval_rows and not eval_examples:
        raise InputError(f"every one of the {len(eval_rows)} held-out rows was dropped by --max-len "
                         f"{config.max_len}; raise --max-len or --eval-size")
    dropped = examples.dropped + eval_examples.dropped
    return config, Inputs(model, tokenizer, examples, eval_examples, len(rows), dict(dropped), fingerprints)


def describe_dropped(rows: int, dropped: dict) -> str:
    reasons = "; ".join(f"{count} {reason}" for reason, count in dropped.items())
    return f"dropped {sum(dropped.values())} of {rows} rows: {reasons}"


def resume_progress(resume_state: dict, inputs: Inputs, setup, config: TrainConfig, log) -> dict:
    """Load a training checkpoint into the set-up model and optimizer; where the run stands."""
    progress = {**restore_training_state(resume_state, inputs.model, setup.optimizer, setup.world.rank),
                "fingerprints": inputs.fingerprints}
    total_steps = count_optimizer_steps(len(inputs.examples), config, setup.world.world_size)
    if progress["step"] >= total_steps:
        raise InputError(f"the run in {config.output_dir} already reached step {progress['step']} "
                         f"of {total_steps}; pass a larger --max-steps or --epochs to extend it")
    log(f"resuming at optimizer step {progress['step']} of {total_steps}")
    return progress


def train(inputs: Inputs, setup, config: TrainConfig, progress: dict, staging, device, log,
          keep_metrics_through=None):
    """train_loop with the run's files: settings and metrics in the staging folder, a training
    checkpoint after the steps --save-every names and on Ctrl-C (only rank 0 writes)."""
    world = setup.world
    tuner = None
    if config.micro_batch == "auto":
        def decided(size: int, why: str) -> None:
            config.micro_batch = size  # the run's settings from here on: its checkpoints and train_config.json
            # Said while the progress bar is up: tqdm.write puts the line above it rather than through it.
            (tqdm.write if log is print else log)(f"--micro-batch auto: {size}, {why}")
            if world.is_main:
                save_json(staging / CONFIG_FILE, config.to_dict())

        tuner = micro_batches(inputs.model, inputs.examples, config, pad_id=pad_token_id(inputs.tokenizer),
                              device=device, loss_fn=setup.loss_fn, world=world, decided=decided)
    metrics_log = None
    if world.is_main:
        save_json(staging / CONFIG_FILE, config.to_dict())
        metrics_log = MetricsLog(staging / METRICS_FILE, keep_through_step=keep_metrics_through,
                                 tensorboard=staging / TENSORBOARD_DIR if config.report_to == "tensorboard" else None)
    reset_peak_memory(device)
    try:
        with StopOnCtrlC() as ctrl_c:
            def save_if_due(progress: dict, total_steps: int) -> None:
                save_checkpoint_if_due(inputs.model, setup.optimizer, config, progress, total_steps=total_steps,
                                       ctrl_c=ctrl_c, device=device, world=world, checkpoint_dir=staging)

            progress = train_loop(inputs.model, setup.optimizer, inputs.examples, config,
                                  pad_id=pad_token_id(inputs.tokenizer), device=device, metrics_log=metrics_log,
                                  eval_examples=inputs.eval_examples, progress=progress, world=world,
                                  loss_fn=setup.loss_fn, scaler=setup.scaler, after_step=save_if_due,
                                  micro_batches=tuner)
        if isinstance(tuner, TryEachSize):
            tuner.choose()  # a run shorter than the probing settles on what it tried
        return progress
    finally:
        if metrics_log is not None:  # flushed line by line; it may stay open across the rename, as Linux allows
            metrics_log.close()


def save_trained(model, tokenizer, config: TrainConfig, staging, setup, delta_metadata: dict) -> None:
    """Write what the run trained into the staging folder: BitFit's delta, or full mode's model folder."""
    if config.fsdp:  # every rank takes part in gathering the shards; rank 0 writes
        save_gathered(model, config, staging, setup.trained_names, delta_metadata, tokenizer, setup.world)
    elif not setup.world.is_main:
        return  # every rank holds the same trained tensors: rank 0's are written
    elif config.mode == "bitfit":
        params = dict(model.named_parameters())
        write_bias_delta(staging / BIAS_FILE, {name: params[name].detach().to("cpu", copy=True)
                                               for name in setup.trained_names}, delta_metadata)
    else:
        save_model_folder(staging / "model", model, tokenizer)


def template_hash(tokenizer, config: TrainConfig) -> str | None:
    """What a delta records of the chat template it was trained through (bitfit.data.templates)."""
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
