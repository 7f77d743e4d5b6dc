"""Which `Trainer` checkpoints are complete, so a resume never picks one a killed save left half-written.

`Trainer._save_checkpoint` writes, in this order: the weights (``model.safetensors`` / sharded index / PEFT
``adapter_model.safetensors``), ``optimizer.pt`` + ``scheduler.pt`` (+ ``scaler.pt``), ``rng_state.pth`` (one per
process: ``rng_state_<i>.pth``), and ``trainer_state.json`` last. A process killed in between leaves a
``checkpoint-N`` folder that `transformers.trainer_utils.get_last_checkpoint` still returns, and resuming from it
fails ("Can't find a valid checkpoint", a missing ``trainer_state.json``, a truncated ``optimizer.pt``).

A checkpoint is *complete* when ``trainer_state.json`` parses and names its step, the weights, the optimizer and
scheduler state and the RNG state of every process are present, and every file a caller adds (``required``, e.g. a
callback's own state) is there too. Files are not read beyond ``trainer_state.json`` and the weights' index: the
state file is written last, after the others were closed, so a parsable one means they were written whole.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints

__all__ = [
    "IncompleteCheckpointError",
    "InterruptedRunError",
    "checkpoint_folders",
    "checkpoint_problems",
    "complete_checkpoints",
    "last_complete_checkpoint",
    "resume_point",
]

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "adapter_model.safetensors", "adapter_model.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class InterruptedRunError(RuntimeError):
    """An output folder holds checkpoints of an interrupted run, and neither resuming nor starting over was asked."""


class IncompleteCheckpointError(ValueError):
    """A folder given to resume from is not a complete Trainer checkpoint; the message lists what is missing."""


def _weights_problem(folder: Path) -> str | None:
    if any((folder / name).is_file() for name in WEIGHT_FILES):
        return None
    for index in WEIGHT_INDEXES:
        if (folder / index).is_file():
            try:
                shards = set(json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return f"{index} is unreadable"
            missing = sorted(s for s in shards if not (folder / s).is_file())
            return f"weight shards missing: {', '.join(missing)}" if missing else None
    if any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir()):
        return None  # DeepSpeed writes the model into its own global_step* folder
    return "no model weights (" + " / ".join(WEIGHT_FILES[:3]) + ")"


def checkpoint_problems(folder: str | os.PathLike, required: Iterable[str] = ()) -> list[str]:
    """What keeps ``folder`` from being a complete checkpoint to resume from (empty list: it is complete)."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["not a folder"]
    problems = []
    state_file = folder / TRAINER_STATE
    if not state_file.is_file():
        problems.append(f"no {TRAINER_STATE}")
    else:
        try:
            state = json.loads(state_file.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
                problems.append(f"{TRAINER_STATE} has no global_step")
        except (OSError, ValueError):
            problems.append(f"{TRAINER_STATE} is truncated or not JSON")
    weights = _weights_problem(folder)
    if weights:
        problems.append(weights)
    deepspeed = any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir())
    if not deepspeed:
        if not ((folder / "optimizer.pt").is_file() or (folder / "optimizer.bin").is_file()):
            problems.append("no optimizer.pt")
        if not (folder / "scheduler.pt").is_file():
            problems.append("no scheduler.pt")
    if not any(folder.glob("rng_state*.pth")):
        problems.append("no rng_state.pth")
    problems += [f"no {name}" for name in required if not (folder / name).exists()]
    return problems


def complete_checkpoints(
    output_dir: str | os.PathLike, required: Iterable[str] = ()
) -> tuple[list[Path], list[tuple[Path, list[str]]]]:
    """``(complete, incomplete)`` ``checkpoint-N`` folders of ``output_dir``, each by step (oldest first); each
    incomplete one comes with its problems."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return [], []
    required = tuple(required)
    complete, incomplete = [], []
    for path in sort_checkpoints(str(output_dir), PREFIX_CHECKPOINT_DIR):
        path = Path(path)
        if not path.name.removeprefix(f"{PREFIX_CHECKPOINT_DIR}-").isdigit():
            continue
        problems = checkpoint_problems(path, required)
        (incomplete.append((path, problems)) if problems else complete.append(path))
    return complete, incomplete


def last_complete_checkpoint(output_dir: str | os.PathLike, required: Iterable[str] = ()) -> Path | None:
    """`transformers.trainer_utils.get_last_checkpoint` that skips incomplete checkpoints (and says which, in the
    log): the newest ``checkpoint-N`` a resume can load, or None."""
    complete, incomplete = complete_checkpoints(output_dir, required)
    last = complete[-1] if complete else None
    for path, problems in incomplete:
        if last is None or _step(path) > _step(last):
            logger.warning("skipping incomplete checkpoint %s (%s): a save was interrupted", path, "; ".join(problems))
    return last


def _step(path: Path) -> int:
    return int(path.name.rsplit("-", 1)[-1])


def checkpoint_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, oldest first (transformers' own listing)."""
    if not Path(output_dir).is_dir():
        return []
    return [Path(p) for p in sort_checkpoints(str(output_dir))]


def resume_point(
    output_dir: str | os.PathLike, resume_from_checkpoint: str | None, start_over: bool = False
) -> str | None:
    """What ``trainer.train(resume_from_checkpoint=...)`` should get for a run writing to ``output_dir``.

    ``None`` (not asked): a fresh start; checkpoints of an interrupted run there are never trained over silently,
    an :class:`InterruptedRunError` says so, unless ``start_over`` (they are removed). ``"last"``: the newest complete
    checkpoint (incomplete ones, left by a killed save, are removed: the resumed run writes them again), or None
    when there is none. A path: that checkpoint. Files are removed on the main process only.
    """
    from accelerate import PartialState

    main, found = PartialState().is_main_process, checkpoint_folders(output_dir)
    if resume_from_checkpoint is None:
        if found and not start_over:
            raise InterruptedRunError(f"{output_dir} holds checkpoints of an interrupted run (last: {found[-1].name})")
        for path in found if main else ():
            shutil.rmtree(path)
        PartialState().wait_for_everyone()
        return None
    if resume_from_checkpoint != "last":
        return str(resume_from_checkpoint)
    last = last_complete_checkpoint(output_dir)  # logs the incomplete ones it skips
    for path in found if main else ():
        if last is None or _step(path) > _step(last):
            shutil.rmtree(path, ignore_errors=True)
    PartialState().wait_for_everyone()
    if last is None:
        logger.warning("%s has no complete checkpoint to resume from; starting from scratch", output_dir)
    return str(last) if last else None
