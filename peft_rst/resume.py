"""Schedule-exact resume in any training loop: the RST reset step travels with the optimizer state.

A tau / keep-ratio schedule is a function of the number of optimizer steps the reset has seen (`ResetGroup.step`).
That number lives in the tuner, which a checkpoint of the weights does not restore, so a resumed run would silently
restart its schedule at step 0. The reset already runs as a global optimizer hook; after every step it also writes
the step into the optimizer's per-parameter state of the RST parameters (``optimizer.state[W]["rst_reset_step"]``,
a plain int). Everything that saves and loads ``optimizer.state_dict()`` therefore carries it: `transformers.Trainer`
checkpoints, Accelerate's ``save_state`` / ``load_state`` and a hand-written loop. Before the next step a global
pre-step hook adopts a step that was loaded into the optimizer (one this process did not write).

Checkpoints written before this existed have optimizer state for the RST parameters but no step. The pre-step hook
then warns and falls back: to the optimizer's own step count when it keeps one (Adam, AdamW: ``state["step"]``),
else to the model's current reset step (0 for a fresh model: the schedule restarts). Call `restore_reset_step` before
resuming to continue such a checkpoint exactly.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .reset import ResetGroup

__all__ = ["RESET_STEP_KEY", "restore_reset_step"]

logger = logging.getLogger(__name__)

RESET_STEP_KEY = "rst_reset_step"
"""Key of the reset step in ``optimizer.state[param]`` of every RST parameter the optimizer steps."""

LEGACY_STEP_FILENAME = "rst_reset_step.json"
"""File the recipes wrote next to each checkpoint before the step moved into the optimizer state."""

# optimizer -> group -> the step this process last wrote into that optimizer's state for that group.
_written: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# optimizer -> the (group, plan) ids its current step does not touch (see `not_stepping`)
_not_stepping: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# optimizers whose current step is torch.distributed.checkpoint's state initialisation, not a training step
_state_init_steps: weakref.WeakSet = weakref.WeakSet()
# where that step comes from: `get_optimizer_state_dict` / `set_optimizer_state_dict` (Accelerate's FSDP2 save_state
# and load_state among them) on an optimizer without state call `_init_optim_state`, which steps with zero grads and lr
_STATE_INIT = ("torch.distributed.checkpoint.state_dict", "_init_optim_state")
# (optimizer, group) pairs already warned about a legacy state, keyed by the id of the loaded state dict
_warned: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def record_reset_step(optimizer: torch.optim.Optimizer, group: ResetGroup, targets: list) -> None:
    """After the reset of step ``group.step``: store the step in the optimizer state of ``targets``."""
    state = optimizer.state
    for target in targets:
        state[target.weight][RESET_STEP_KEY] = group.step
    _written.setdefault(optimizer, weakref.WeakKeyDictionary())[group] = group.step


def sync_reset_step(optimizer: torch.optim.Optimizer, group: ResetGroup) -> None:
    """Before a step: adopt a reset step loaded into ``optimizer`` (or fall back for a legacy state)."""
    param_state = _first_state(optimizer, group)
    if param_state is None:  # this optimizer has not stepped the group's parameters yet (or does not hold them)
        return
    stored = param_state.get(RESET_STEP_KEY)
    if stored is not None:
        if stored != _written.get(optimizer, {}).get(group):  # not what this process wrote: a loaded state
            group.step = int(stored)
        return
    _legacy_fallback(optimizer, group, param_state)


def before_optimizer_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """Global optimizer pre-step hook (registered with the reset's post-step hook).

    It runs before the step of every optimizer in the process, so an optimizer that holds none of a group's
    parameters (another model's, a second optimizer) is recognised without walking the group's layers.
    """
    from .reset import _groups, _lock, current_plan, held_ids

    _state_init_steps.discard(optimizer)
    _not_stepping.pop(optimizer, None)
    if not optimizer.state:  # nothing loaded, nothing stepped yet
        if _called_by_state_init():
            _state_init_steps.add(optimizer)
        return
    with _lock:
        groups = list(_groups)
    state, held, others = optimizer.state, None, []
    for group in groups:
        plan = group.plan
        if plan is None or not plan.targets or not state.get(plan.targets[0].weight):
            # not the usual case (this optimizer has stepped the group's first W): look closer
            plan = current_plan(group)
            if plan is not None:
                held = held_ids(optimizer) if held is None else held
                if plan.weight_ids.isdisjoint(held):
                    others.append((id(group), id(plan)))
                    continue
        sync_reset_step(optimizer, group)
    if others:
        _not_stepping[optimizer] = others


def not_stepping(optimizer: torch.optim.Optimizer) -> list[tuple[int, int]]:
    """The (group, plan) ids that the pre-step hook of the step running now found `optimizer` holds nothing of.

    Taken once by the post-step hook of the same step: the step changes values, not which tensors the model holds,
    so the post-step hook need not check those plans again.
    """
    return _not_stepping.pop(optimizer, [])


def _called_by_state_init() -> bool:
    """Whether the optimizer step running now is torch.distributed.checkpoint's `_init_optim_state`.

    That step (zero gradients, lr 0) only creates the optimizer state that a state dict is read from or loaded into;
    counting it as an RST step would advance the schedule by one and apply a reset to the weights just loaded.
    """
    frame = sys._getframe(1)
    for _ in range(64):  # the optimizer's step wrappers and hook dispatch sit between it and this hook
        if frame is None:
            return False
        code = frame.f_code
        if code.co_name == _STATE_INIT[1] and frame.f_globals.get("__name__") == _STATE_INIT[0]:
            return True
        frame = frame.f_back
    return False


def is_state_init_step(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step `optimizer` just took was checkpoint state initialisation (see `_called_by_state_init`)."""
    return optimizer in _state_init_steps


def _first_state(optimizer: torch.optim.Optimizer, group: ResetGroup) -> dict | None:
    """The optimizer state of the group's first parameter that has one (layer by layer: usually the first)."""
    state = optimizer.state
    if not state:
        return None
    for layer in group.layers:
        for target in layer.reset_targets(group.adapter_name):
            found = state.get(target.weight)  # .get: the state is a defaultdict, indexing would add entries
            if found:
                return found
    return None


def _legacy_fallback(optimizer: torch.optim.Optimizer, group: ResetGroup, param_state: dict) -> None:
    marker = id(optimizer.state)
    if _warned.setdefault(optimizer, weakref.WeakKeyDictionary()).get(group) == marker:
        return
    _warned[optimizer][group] = marker
    own = param_state.get("step")
    how = (
        "Call peft_rst.restore_reset_step(model, checkpoint_dir) (or model.set_reset_step(n)) before resuming "
        "to continue it exactly; checkpoints saved from now on carry the step."
    )
    if group.step == 0 and own is not None:
        group.step = int(own)  # Adam-style optimizers count the steps done, which is the reset step
        logger.warning(
            "RST adapter %r: the loaded optimizer state has no %r (a checkpoint saved before RST stored it); "
            "continuing the reset schedule from the optimizer's own step count %d. %s",
            group.adapter_name,
            RESET_STEP_KEY,
            group.step,
            how,
        )
    elif group.step == 0:
        logger.warning(
            "RST adapter %r: the loaded optimizer state has no %r (a checkpoint saved before RST stored it) and "
            "the optimizer keeps no step count: the reset schedule restarts at step 0. %s",
            group.adapter_name,
            RESET_STEP_KEY,
            how,
        )


def _tuner(model: Any) -> Any:
    """The `RSTModel` of a `PeftModel` (or the tuner itself)."""
    tuner = getattr(model, "base_model", model)
    if not hasattr(tuner, "set_reset_step"):
        raise TypeError(
            f"{type(model).__name__} is not an RST model: pass the PeftModel returned by "
            "get_peft_model(model, RSTConfig(...)) or its RSTModel."
        )
    return tuner


def restore_reset_step(model: Any, checkpoint_dir: str | os.PathLike, adapter_name: str | None = None) -> int:
    """Set the reset step of ``model`` from a checkpoint folder that predates the step in the optimizer state.

    Reads the recipes' legacy ``rst_reset_step.json`` if present, else ``trainer_state.json``'s ``global_step``
    (equal to the optimizer steps unless fp16 skipped some). Returns the step set. A checkpoint whose optimizer state
    carries the step needs none of this: the step is adopted at the first optimizer step after loading.
    """
    tuner = _tuner(model)
    folder = Path(checkpoint_dir)
    legacy, trainer_state = folder / LEGACY_STEP_FILENAME, folder / "trainer_state.json"
    if legacy.is_file():
        step, key = json.loads(legacy.read_text())["reset_step"], "reset_step"
    elif trainer_state.is_file():
        step, key = json.loads(trainer_state.read_text())["global_step"], "global_step"
    else:
        raise FileNotFoundError(
            f"{folder} has neither {LEGACY_STEP_FILENAME} nor trainer_state.json; set the step yourself with "
            "model.base_model.set_reset_step(optimizer_steps_done)."
        )
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"{folder}: {key} is {step!r}, not a non-negative integer.")
    tuner.set_reset_step(step, adapter_name)
    return step
