"""``--report_to`` passes through to the Trainer: TensorBoard logging works offline (sockets are off in tests)."""

from __future__ import annotations

import pytest
from test_run_uda import argv, make_office_home, make_tiny_clip, write_small_config  # same folder

from recipes import office_home, run_uda


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


def _scalars(folder) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[float]] = {}
    for run_dir in sorted({events.parent for events in folder.rglob("events.out.tfevents.*")}):
        acc = EventAccumulator(str(run_dir))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend(e.value for e in acc.Scalars(tag))
    return out


def test_tensorboard_logs_losses_and_evaluations_offline(assets, tmp_path):
    out = tmp_path / "tb"
    run_uda.run_recipe(
        office_home.main, argv(assets, out, "--report_to", "tensorboard", "--logging_steps", "1", iterations=2)
    )
    scalars = _scalars(out / "Ar-Cl")
    assert len(scalars.get("train/loss", [])) == 2, sorted(scalars)  # one per step (--logging_steps 1)
    assert all(v == v and v > 0 for v in scalars["train/loss"])  # finite, positive losses
    assert len(scalars.get("eval/accuracy", [])) >= 1, sorted(scalars)  # the evaluation at step 2


def test_report_to_none_writes_no_event_files(assets, tmp_path):
    out = tmp_path / "none"
    run_uda.run_recipe(office_home.main, argv(assets, out, iterations=2))  # the preset's default: none
    assert not list(out.rglob("events.out.tfevents.*"))
