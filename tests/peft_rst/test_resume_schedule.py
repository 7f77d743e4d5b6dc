"""Schedule-exact resume: the RST reset step travels with the optimizer state (peft_rst/resume.py).

Every test compares an interrupted-and-resumed run against an uninterrupted one in the same process: bitwise the
same trained weights and the same reset step. The schedule is a linear tau ramp whose thresholds matter for the
weights, so a schedule restarted at step 0 ends with different weights (checked too, so the comparison can fail).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from tiny_vision import tiny_clip_vision_config  # same folder
from torch import nn
from transformers import CLIPVisionModel, Trainer, TrainingArguments

import peft_rst
from peft_rst import RSTConfig
from peft_rst.resume import LEGACY_STEP_FILENAME, RESET_STEP_KEY

STEPS, HALF, BATCH = 8, 4, 4
NUM_CLASSES = 3


class TinyClassifier(nn.Module):
    """A CLIP vision tower (from a config, no download) with a linear head; Trainer-style dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.vision = CLIPVisionModel(tiny_clip_vision_config())
        self.head = nn.Linear(self.vision.config.hidden_size, NUM_CLASSES)

    def forward(self, pixel_values, labels=None):
        logits = self.head(self.vision(pixel_values=pixel_values).pooler_output)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def _rst_config(schedule: str = "tau") -> RSTConfig:
    targets = dict(target_modules=["q_proj", "v_proj", "fc1", "fc2"], modules_to_save=["head"])
    if schedule == "keep_ratio":  # keep the top 50 % of changed entries, decaying to 5 % over the run
        return RSTConfig(
            keep_ratio=0.5, keep_ratio_end=0.05, keep_ratio_schedule="linear", schedule_steps=STEPS, **targets
        )
    if schedule == "keep_ratio_up":  # the kept fraction grows: a reset with an early step's fraction undoes progress
        return RSTConfig(
            keep_ratio=0.05, keep_ratio_end=0.5, keep_ratio_schedule="linear", schedule_steps=STEPS, **targets
        )
    # tau grows 0 -> 2e-3 over the run: late steps reset far more entries than early ones
    return RSTConfig(tau=0.0, tau_end=2e-3, tau_schedule="linear", schedule_steps=STEPS, **targets)


def _model(schedule: str = "tau"):
    torch.manual_seed(0)
    return get_peft_model(TinyClassifier(), _rst_config(schedule))


def _data(n: int = STEPS * BATCH) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": i % NUM_CLASSES} for i in range(n)]


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_bitwise(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def _differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[n], b[n]) for n in a)


def _args(out: Path, optim: str) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(out),
        use_cpu=True,
        report_to="none",
        max_steps=STEPS,
        save_strategy="steps",
        save_steps=HALF,
        logging_strategy="no",
        disable_tqdm=True,
        per_device_train_batch_size=BATCH,
        learning_rate=0.05 if optim == "sgd" else 3e-3,
        optim=optim,
        optim_args="momentum=0.9" if optim == "sgd" else None,
        lr_scheduler_type="constant",
        seed=0,
        remove_unused_columns=False,
    )


def _train(out: Path, optim: str, resume: Path | None = None, before=None):
    model = _model()
    if before is not None:
        before(model)
    Trainer(model=model, args=_args(out, optim), train_dataset=_data()).train(
        resume_from_checkpoint=str(resume) if resume else None
    )
    return model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per optimizer (SGD with momentum: no own step count; AdamW: counts its steps)."""
    runs = {}
    for optim in ("sgd", "adamw_torch"):
        out = tmp_path_factory.mktemp(f"full_{optim}")
        model = _train(out, optim)
        runs[optim] = (out, _trained(model), model.base_model.reset_step())
    return runs


def _strip_step(checkpoint: Path, dest: Path) -> Path:
    """A copy of a checkpoint as written before the step was stored (optimizer state without RESET_STEP_KEY)."""
    shutil.copytree(checkpoint, dest)
    state = torch.load(dest / "optimizer.pt", weights_only=True)
    found = sum(per_param.pop(RESET_STEP_KEY, None) is not None for per_param in state["state"].values())
    assert found > 0, "the checkpoint's optimizer state did not carry the reset step"
    torch.save(state, dest / "optimizer.pt")
    return dest


@pytest.mark.parametrize("optim", ["sgd", "adamw_torch"])
def test_plain_trainer_resume_is_schedule_exact(uninterrupted, tmp_path, optim):
    full_dir, full_weights, full_step = uninterrupted[optim]
    assert full_step == STEPS
    checkpoint = full_dir / f"checkpoint-{HALF}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {s.get(RESET_STEP_KEY) for s in saved["state"].values()} >= {HALF}

    resumed = _train(tmp_path / "resumed", optim, resume=checkpoint)
    assert resumed.base_model.reset_step() == STEPS
    _assert_bitwise(_trained(resumed), full_weights)


def test_legacy_checkpoint_sgd_warns_and_restarts_then_restore_is_exact(uninterrupted, tmp_path, caplog):
    full_dir, full_weights, _ = uninterrupted["sgd"]
    legacy = _strip_step(full_dir / f"checkpoint-{HALF}", tmp_path / "legacy")

    with caplog.at_level(logging.WARNING, logger="peft_rst.resume"):
        restarted = _train(tmp_path / "restarted", "sgd", resume=legacy)
    warnings = [r.getMessage() for r in caplog.records if r.name == "peft_rst.resume"]
    assert len(warnings) == 1 and "restarts at step 0" in warnings[0] and "restore_reset_step" in warnings[0]
    # the documented fallback: the schedule restarted, so the run differs from the uninterrupted one
    assert restarted.base_model.reset_step() == STEPS - HALF
    assert _differs(_trained(restarted), full_weights)

    # restore_reset_step before resuming (trainer_state.json's global_step) makes it exact again, without warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="peft_rst.resume"):
        exact = _train(
            tmp_path / "exact", "sgd", resume=legacy, before=lambda model: peft_rst.restore_reset_step(model, legacy)
        )
    assert not [r for r in caplog.records if r.name == "peft_rst.resume"]
    assert exact.base_model.reset_step() == STEPS
    _assert_bitwise(_trained(exact), full_weights)


def test_legacy_checkpoint_adam_falls_back_to_its_step_count(uninterrupted, tmp_path, caplog):
    full_dir, full_weights, _ = uninterrupted["adamw_torch"]
    legacy = _strip_step(full_dir / f"checkpoint-{HALF}", tmp_path / "legacy")
    with caplog.at_level(logging.WARNING, logger="peft_rst.resume"):
        resumed = _train(tmp_path / "resumed", "adamw_torch", resume=legacy)
    warnings = [r.getMessage() for r in caplog.records if r.name == "peft_rst.resume"]
    assert len(warnings) == 1 and f"own step count {HALF}" in warnings[0]
    assert resumed.base_model.reset_step() == STEPS
    _assert_bitwise(_trained(resumed), full_weights)


def test_restore_reset_step_reads_the_recipes_legacy_file(tmp_path):
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (folder / LEGACY_STEP_FILENAME).write_text(json.dumps({"reset_step": 5, "global_step": 7}))
    model = _model()
    assert peft_rst.restore_reset_step(model, folder) == 5  # fp16-skipped steps: the legacy file is exact
    assert model.base_model.reset_step() == 5
    (folder / LEGACY_STEP_FILENAME).unlink()
    assert peft_rst.restore_reset_step(model, folder) == 7


def test_restore_reset_step_refuses_bad_input(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError, match="trainer_state.json"):
        peft_rst.restore_reset_step(model, tmp_path)
    (tmp_path / "trainer_state.json").write_text(json.dumps({"global_step": -1}))
    with pytest.raises(ValueError, match="non-negative"):
        peft_rst.restore_reset_step(model, tmp_path)
    with pytest.raises(TypeError, match="not an RST model"):
        peft_rst.restore_reset_step(nn.Linear(2, 2), tmp_path)
    assert model.base_model.reset_step() == 0  # refused: unchanged


def _hand_steps(model, optimizer, batches) -> None:
    for batch in batches:
        model(**batch)["loss"].backward()
        optimizer.step()
        optimizer.zero_grad()


def _batches() -> list[dict]:
    data = _data()
    return [
        {
            "pixel_values": torch.stack([d["pixel_values"] for d in data[i : i + BATCH]]),
            "labels": torch.tensor([d["labels"] for d in data[i : i + BATCH]]),
        }
        for i in range(0, len(data), BATCH)
    ]


@pytest.mark.parametrize("schedule", ["tau", "keep_ratio"])
def test_hand_loop_saving_optimizer_state_dict_is_schedule_exact(tmp_path, schedule):
    batches = _batches()
    full = _model(schedule)
    full_opt = torch.optim.SGD([p for p in full.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    _hand_steps(full, full_opt, batches)

    first = _model(schedule)
    opt = torch.optim.SGD([p for p in first.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    _hand_steps(first, opt, batches[:HALF])
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)

    def resumed(optimizer_state: dict) -> nn.Module:
        second = _model(schedule)  # a new process would build the model and optimizer afresh
        second.load_state_dict(saved["model"])
        opt2 = torch.optim.SGD([p for p in second.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        opt2.load_state_dict(optimizer_state)
        assert second.base_model.reset_step() == 0  # adopted at the first step, not at load time
        _hand_steps(second, opt2, batches[HALF:])
        return second

    exact = resumed(saved["optimizer"])
    assert exact.base_model.reset_step() == full.base_model.reset_step() == STEPS
    _assert_bitwise(_trained(exact), _trained(full))
    # the same without the stored step restarts the schedule and ends elsewhere: the comparison can fail
    for per_param in saved["optimizer"]["state"].values():
        per_param.pop(RESET_STEP_KEY, None)
    assert _differs(_trained(resumed(saved["optimizer"])), _trained(full))


def test_set_reset_step_is_not_overridden_by_the_running_optimizer():
    """The optimizer's own record is adopted only after a load; a user's set_reset_step on a live run stands."""
    model = _model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    batches = _batches()
    _hand_steps(model, opt, batches[:2])
    model.base_model.set_reset_step(6)
    _hand_steps(model, opt, batches[2:3])
    assert model.base_model.reset_step() == 7


def test_distributed_checkpoint_state_dicts_are_schedule_exact():
    """torch.distributed.checkpoint's `get_optimizer_state_dict` / `set_optimizer_state_dict` (what Accelerate's
    FSDP2 `save_state` / `load_state` call) first step an optimizer without state with zero grads and lr 0
    (`_init_optim_state`). That step is no training step: it must neither count nor reset. Counted, it put a fresh
    run one schedule step ahead, and after loading it reset the loaded weights with step 1's fraction."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    def setup():
        model = _model("keep_ratio_up")
        return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)

    batches = _batches()
    full, full_opt = setup()
    _hand_steps(full, full_opt, batches)

    first, opt = setup()
    before = _trained(first)
    get_optimizer_state_dict(first, opt)  # on the fresh optimizer: its state-initialising step
    assert first.base_model.reset_step() == 0
    _assert_bitwise(_trained(first), before)
    _hand_steps(first, opt, batches[:HALF])
    model_state, optimizer_state = get_model_state_dict(first), get_optimizer_state_dict(first, opt)
    assert {s[RESET_STEP_KEY] for s in optimizer_state["state"].values() if RESET_STEP_KEY in s} == {HALF}

    second, opt2 = setup()
    set_model_state_dict(second, model_state)
    loaded = _trained(second)
    set_optimizer_state_dict(second, opt2, optimizer_state)  # steps the fresh optimizer first
    assert second.base_model.reset_step() == 0  # adopted at the first step, not at load time
    _assert_bitwise(_trained(second), loaded)
    _hand_steps(second, opt2, batches[HALF:])
    assert second.base_model.reset_step() == full.base_model.reset_step() == STEPS
    _assert_bitwise(_trained(second), _trained(full))


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_save_state_load_state_is_schedule_exact(tmp_path, fresh_accelerate_state):
    from accelerate import Accelerator

    batches = _batches()

    def setup():
        accelerator = Accelerator(cpu=True)
        model = _model()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        return accelerator, *accelerator.prepare(model, opt)

    accelerator, full, full_opt = setup()
    _hand_steps(full, full_opt, batches)
    full_weights, full_step = _trained(full), full.base_model.reset_step()

    accelerator, first, opt = setup()
    _hand_steps(first, opt, batches[:HALF])
    accelerator.save_state(str(tmp_path / "state"))

    accelerator, second, opt2 = setup()
    accelerator.load_state(str(tmp_path / "state"))
    _hand_steps(second, opt2, batches[HALF:])
    assert second.base_model.reset_step() == full_step == STEPS
    _assert_bitwise(_trained(second), full_weights)
