"""An interrupted recipe run, resumed from its last checkpoint, ends bitwise where an uninterrupted run ends.

What must survive the interruption: weights (RST's W and the dense head), optimizer and scheduler state, the RST
reset schedule's step (in the optimizer state, peft_rst.resume), and the
training augmentations (random crops/flips drawn per (seed, batch, position), not from a stream).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_run_uda import argv, make_office_home, make_tiny_clip, write_small_config  # same folder: shared assets
from transformers import TrainerCallback

from recipes import office_home, run_uda
from recipes.core import outputs


class Interrupt(TrainerCallback):
    """Stops the run like Ctrl-C right after checkpoint ``at_step`` (or after evaluation number ``at_eval``)."""

    def __init__(self, at_step: int | None = None, at_eval: int | None = None):
        self.at_step, self.at_eval, self.evals = at_step, at_eval, 0

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt(f"interrupted after checkpoint-{state.global_step}")

    def on_evaluate(self, args, state, control, **kwargs):
        self.evals += 1
        if self.evals == self.at_eval:
            raise KeyboardInterrupt("interrupted during evaluation")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


def reset_steps(checkpoint) -> set[int]:
    """The RST reset schedule's step as saved with the optimizer state (peft_rst.resume), over the RST parameters."""
    state = torch.load(checkpoint / "optimizer.pt", weights_only=True)["state"]
    return {int(s["rst_reset_step"]) for s in state.values() if "rst_reset_step" in s}


def tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resumed_rst_run_ends_with_the_weights_of_an_uninterrupted_run(assets, tmp_path):
    flags = ["--rst", "--tau", "1e-3", "--keep_checkpoints", "--logging_steps", "1"]
    straight_dir, broken_dir = tmp_path / "straight", tmp_path / "broken"
    straight = office_home.main(argv(assets, straight_dir, *flags, iterations=6))

    with pytest.raises(KeyboardInterrupt):
        office_home.main(argv(assets, broken_dir, *flags, iterations=6), callbacks=[Interrupt(at_step=2)])
    task = broken_dir / "Ar-Cl"
    assert sorted(p.name for p in task.iterdir()) == ["checkpoint-2"]  # no adapter, no task result, no results.json
    assert reset_steps(task / "checkpoint-2") == {2}

    # the same command again would train over the interrupted run's checkpoints: refused with the way out
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(office_home.main, argv(assets, broken_dir, *flags, iterations=6))
    assert "interrupted run" in str(exc.value.code) and "--resume_from_checkpoint" in str(exc.value.code)

    resumed = office_home.main(argv(assets, broken_dir, *flags, "--resume_from_checkpoint", iterations=6))

    a, b = straight_dir / "Ar-Cl", broken_dir / "Ar-Cl"
    for name in ("checkpoint-6/adapter_model.safetensors", "adapter/adapter_model.safetensors"):
        assert tensors_equal(load_file(a / name), load_file(b / name)), name
    opt_a, opt_b = (torch.load(d / "checkpoint-6" / "optimizer.pt", weights_only=True) for d in (a, b))
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for key in opt_a["state"]:
        assert torch.equal(opt_a["state"][key]["momentum_buffer"], opt_b["state"][key]["momentum_buffer"])
    for d in (a, b):  # the reset schedule continued from 2 instead of starting over
        assert reset_steps(d / "checkpoint-6") == {6}
    strip = {k: v for k, v in straight["methods"]["CMKD+RST"]["Ar->Cl"].items() if k != "path"}
    assert {k: v for k, v in resumed["methods"]["CMKD+RST"]["Ar->Cl"].items() if k != "path"} == strip
    state_a, state_b = (json.loads((d / "checkpoint-6" / "trainer_state.json").read_text()) for d in (a, b))
    losses = [[h["loss"] for h in s["log_history"] if "loss" in h] for s in (state_a, state_b)]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_restarted_all_run_keeps_finished_tasks_and_does_the_rest(assets, tmp_path):
    out = tmp_path / "all"
    flags = ["--all", "--zero-shot"]
    with pytest.raises(KeyboardInterrupt):
        office_home.main(argv(assets, out, *flags, task=None), callbacks=[Interrupt(at_eval=2)])
    first = out / "Ar-Cl" / outputs.TASK_RESULT_FILENAME
    assert first.is_file() and not (out / "Cl-Ar" / outputs.TASK_RESULT_FILENAME).exists()
    assert not (out / "results.json").exists()
    stamp = first.stat().st_mtime_ns

    # another method cannot pick up those task results
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(office_home.main, argv(assets, out, "--all", "--baseline", task=None))
    assert "holds a finished CLIP run, but this run is Baseline" in str(exc.value.code)

    results = office_home.main(argv(assets, out, *flags, task=None))
    assert first.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert sorted(results["methods"]["CLIP"]) == ["Ar->Cl", "Cl->Ar", "Pr->Re"]
    assert json.loads((out / "results.json").read_text()) == results


def test_interrupted_overwrite_leaves_no_stale_finished_task(assets, tmp_path):
    out = tmp_path / "ow"
    office_home.main(argv(assets, out, "--zero-shot"))
    assert (out / "results.json").is_file() and (out / "Ar-Cl" / outputs.TASK_RESULT_FILENAME).is_file()
    with pytest.raises(KeyboardInterrupt):
        office_home.main(argv(assets, out, "--zero-shot", "--overwrite"), callbacks=[Interrupt(at_eval=1)])
    # neither the run nor the task counts as finished any more: the next run recomputes instead of reusing them
    assert not (out / "results.json").exists() and not (out / "Ar-Cl" / outputs.TASK_RESULT_FILENAME).exists()
    assert office_home.main(argv(assets, out, "--zero-shot"))["methods"]["CLIP"]["Ar->Cl"]["num_eval"] == 12
