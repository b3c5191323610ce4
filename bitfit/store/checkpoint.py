"""A training checkpoint (checkpoint.pt): what it takes to continue a run exactly where it stopped (--resume).

A training checkpoint holds the trainable tensors (in BitFit, the biases: a few MB whatever the model
size), the optimizer's moments, the progress counters and the random-number state. The frozen
weights are not in it: they are reloaded from the base model, so the progress also records
fingerprints of the base and of the data, and a resumed run refuses to go on if either changed.

A run passes save_checkpoint_if_due to the training loop as its after_step, inside StopOnCtrlC:
a checkpoint is written every --save-every steps, and when Ctrl-C asks the run to stop.

Under --fsdp (bitfit.parallel.fsdp) no rank holds the whole of the trained tensors: each rank writes its
shards of them and of AdamW's moments with torch.distributed.checkpoint, into a folder beside
checkpoint.pt, which then names it (save_sharded_training_state).
"""

import dataclasses
import random
import shutil
import signal
import threading
from pathlib import Path

import torch
from tqdm import tqdm

from bitfit.config import TrainConfig, canonical_template
from bitfit.core.trainable import trainable_parameters
from bitfit.errors import Diverged, InputError, Interrupted
from bitfit.store.files import first_non_finite, refuse_non_finite, save_torch
from bitfit.store.run_folder import CHECKPOINT_FILE, SHARDED_CHECKPOINT, find_checkpoint

CHECKPOINT_FORMAT = "bitfit-checkpoint/1"
CHECKPOINT_KEYS = ("config", "trainable", "optimizer", "progress", "rng")
SHARDED_CHECKPOINT_KEYS = ("config", "progress", "rng")  # --fsdp: the tensors are in the folder it names


def save_training_state(output_dir, model, optimizer, config, progress: dict, rng_per_rank: list[dict]) -> None:
    state = {
        **run_state(config, progress, rng_per_rank),
        "trainable": {name: param.detach().to("cpu", copy=True)
                      for name, param in trainable_parameters(model).items()},
        # The learning-rate schedule needs no state of its own: it is a function of the step.
        "optimizer": optimizer.state_dict(),
    }
    refuse_non_finite(state["trainable"], f"checkpoint at optimizer step {progress['step']}")
    save_torch(state, Path(output_dir) / CHECKPOINT_FILE)


def run_state(config, progress: dict, rng_per_rank: list[dict]) -> dict:
    """All of a checkpoint but the tensors: the settings, where the run stands, the random state of
    every rank (under torchrun each rank draws its own dropout masks; rng is rank 0's, as checkpoints
    from before rng_per_rank hold it)."""
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "progress": dict(progress),
        "rng": rng_per_rank[0],
        "rng_per_rank": rng_per_rank,
    }


def rng_state() -> dict:
    """This process's random state. Dropout draws from torch's generators; the data order has its own
    seeded one, and bitfit draws no numpy random numbers."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_sharded_training_state(output_dir, model, optimizer, config, progress: dict, rng_per_rank: list[dict], *,
                                device, world) -> None:
    """--fsdp, on every rank: the trained tensors and AdamW's moments, each rank its shards, into a
    folder named by the step; then rank 0 writes checkpoint.pt naming it, and removes older ones.
    A crash before checkpoint.pt is replaced leaves it naming the previous, complete folder."""
    import torch.distributed.checkpoint as dcp  # here, not above: one process never needs it

    shards = {name: param.to_local() for name, param in trainable_parameters(model).items()}
    if world.any(first_non_finite(shards) is not None, device):  # every rank refuses, or none
        raise Diverged(f"checkpoint at optimizer step {progress['step']}: the trained tensors hold NaN or "
                         f"inf values; nothing was written (try a lower --lr)")
    output_dir = Path(output_dir)
    folder = output_dir / SHARDED_CHECKPOINT.format(step=progress["step"])
    dcp.save(sharded_state(model, optimizer), checkpoint_id=folder)
    if world.is_main:
        save_torch({**run_state(config, progress, rng_per_rank), "sharded": folder.name}, output_dir / CHECKPOINT_FILE)
        for old in output_dir.glob(SHARDED_CHECKPOINT.format(step="*")):
            if old != folder:
                shutil.rmtree(old)


def sharded_state(model, optimizer) -> dict:
    """The state torch.distributed.checkpoint saves, and loads into: the trained tensors (not the
    frozen weights, which come from the base again) and AdamW's moments, as this rank's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)),
            "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_training_state(run_dir: str) -> dict:
    """The training checkpoint --resume RUN_DIR continues from (bitfit.store.run_folder.find_checkpoint), checked."""
    path = find_checkpoint(run_dir)
    try:
        # weights_only: a checkpoint is data (tensors, numbers, strings), never code to run.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a damaged file
        raise InputError(f"{path}: not a readable bitfit checkpoint ({type(error).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: not a bitfit checkpoint")
    required = SHARDED_CHECKPOINT_KEYS if "sharded" in state else CHECKPOINT_KEYS
    missing = [key for key in required if not isinstance(state.get(key), dict)]
    if "rng" not in missing:
        missing += [f"rng.{key}" for key in ("torch", "python", "cuda") if key not in state["rng"]]
    if missing:
        raise InputError(f"{path}: a damaged bitfit checkpoint: it has no {', '.join(missing)}")
    # Runs from before --format and --template read alpaca rows through the human-assistant template,
    # which runs from before its rename call seed.
    state["config"] = {"format": "alpaca", "template": "human-assistant", **state["config"]}
    state["config"]["template"] = canonical_template(state["config"]["template"])
    unknown = sorted(set(state["config"]) - {field.name for field in dataclasses.fields(TrainConfig)})
    if unknown:
        raise InputError(f"{path}: unknown setting(s) {', '.join(unknown)} (written by another version of "
                         f"bitfit?)")
    if "sharded" in state:  # --fsdp: from the name of its folder of shards to where that is now
        state["sharded"] = str(path.parent / str(state["sharded"]))
        if not Path(state["sharded"]).is_dir():
            raise InputError(f"{path}: its shards, {state['sharded']}, are missing")
    return state


def refuse_changed_inputs(progress: dict, fingerprints: dict, run_dir: str) -> None:
    """--resume continues on the rows and the base the run started from, or not at all.

    fingerprints holds the ones known so far (the data's before the model loads, then the base's);
    a checkpoint from before fingerprints were recorded is not checked.
    """
    recorded = progress.get("fingerprints") or {}
    changed = {"data": ("the training data (its rows differ)", "--data"),
               "base": ("the base model (its weights differ)", "--model"),
               "chat_template": ("the base's chat template (its text differs)", "--model and chat template")}
    for what, actual in fingerprints.items():
        if recorded.get(what) not in (None, actual):
            description, flag = changed[what]
            raise InputError(f"--resume {run_dir}: {description} changed since the run started (fingerprint "
                             f"{recorded[what]}, now {actual}); resume with the same {flag}, or start a new run")


def restore_training_state(state: dict, model, optimizer, rank: int = 0) -> dict:
    """Load the tensors, optimizer and RNG state into a freshly set-up run; return its progress."""
    params = dict(model.named_parameters())
    try:
        if "sharded" in state:
            load_sharded_state(state["sharded"], model, optimizer)
        else:
            with torch.no_grad():
                for name, tensor in state["trainable"].items():
                    params[name].copy_(tensor)
            optimizer.load_state_dict(state["optimizer"])
        # Each rank its own random state, where the checkpoint holds every rank's (a resumed run on another
        # number of ranks, or a checkpoint from before they were kept, takes rank 0's).
        per_rank = state.get("rng_per_rank") or [state["rng"]]
        rng = per_rank[rank] if rank < len(per_rank) else state["rng"]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    except (KeyError, ValueError, TypeError, RuntimeError) as error:  # a damaged or forged checkpoint
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise InputError(f"the checkpoint does not fit this run ({type(error).__name__}: {first_line})") from None
    if rng["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    progress = dict(state["progress"])
    if "padded_tokens" in progress:  # the name of tokens_with_padding in checkpoints written before it
        progress["tokens_with_padding"] = progress.pop("padded_tokens")
    return progress


def load_sharded_state(folder: str, model, optimizer) -> None:
    """--fsdp, on every rank: each loads its shards from the folder save_sharded_training_state wrote."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    state = sharded_state(model, optimizer)
    dcp.load(state, checkpoint_id=folder)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # no frozen weights
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def save_checkpoint_if_due(model, optimizer, config, progress: dict, *, total_steps: int, ctrl_c, device,
                           world, checkpoint_dir=None) -> None:
    """After an optimizer step: write checkpoint.pt every --save-every steps and at the last step,
    or when Ctrl-C was pressed, and then stop the run with Interrupted.

    It goes in checkpoint_dir (the run's staging folder, see bitfit.store.run_folder), by default config.output_dir.
    """
    step = progress["step"]
    last_step = step == total_steps
    stop = world.any(ctrl_c.pressed, device)  # every rank stops at the same step
    save = stop or (config.save_every and (step % config.save_every == 0 or last_step))
    rng_per_rank = world.gather(rng_state()) if save else None  # every rank takes part
    if save and config.fsdp:  # each rank holds shards of the state: all of them save
        save_sharded_training_state(checkpoint_dir or config.output_dir, model, optimizer, config, progress,
                                    rng_per_rank, device=device, world=world)
    elif save and world.is_main:  # the ranks hold the same tensors: one copy is enough
        save_training_state(checkpoint_dir or config.output_dir, model, optimizer, config, progress, rng_per_rank)
    if stop and not last_step:
        raise Interrupted(f"checkpoint saved at optimizer step {step} of {total_steps} in "
                          f"{config.output_dir}; continue with: python train.py --resume "
                          f"{config.output_dir}")


class StopOnCtrlC:
    """While training, Ctrl-C asks for a stop after the current step (with a checkpoint);
    a second Ctrl-C stops at once."""

    def __enter__(self):
        self.pressed = False
        self.active = threading.current_thread() is threading.main_thread()  # signals need it
        if self.active:
            self.previous = signal.signal(signal.SIGINT, self._on_ctrl_c)
        return self

    def _on_ctrl_c(self, signum, frame):
        self.pressed = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        tqdm.write("Ctrl-C: stopping after this step and saving a checkpoint (press again to quit now)")

    def __exit__(self, *exc_info):
        if self.active:
            signal.signal(signal.SIGINT, self.previous)
