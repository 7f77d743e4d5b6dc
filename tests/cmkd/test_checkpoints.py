"""cmkd.checkpoints.resume_point: resume from the last complete checkpoint, or refuse to train over an interrupted
run."""

import json

import pytest

from cmkd.checkpoints import InterruptedRunError, checkpoint_folders, resume_point


def checkpoint(root, step: int, complete: bool = True):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (folder / name).write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_a_fresh_start_over_checkpoints_is_refused_unless_starting_over(tmp_path):
    assert resume_point(tmp_path / "new", None) is None
    checkpoint(tmp_path, 2)
    with pytest.raises(InterruptedRunError, match="holds checkpoints of an interrupted run \\(last: checkpoint-2\\)"):
        resume_point(tmp_path, None)
    assert checkpoint_folders(tmp_path) == [tmp_path / "checkpoint-2"]  # a refusal removes nothing
    assert resume_point(tmp_path, None, start_over=True) is None and checkpoint_folders(tmp_path) == []


def test_last_is_the_newest_complete_checkpoint_and_newer_broken_ones_go(tmp_path, caplog):
    checkpoint(tmp_path, 2)
    checkpoint(tmp_path, 4)
    checkpoint(tmp_path, 6, complete=False)  # a killed save
    assert resume_point(tmp_path, "last") == str(tmp_path / "checkpoint-4")
    assert checkpoint_folders(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"]
    assert resume_point(tmp_path, str(tmp_path / "checkpoint-2")) == str(tmp_path / "checkpoint-2")
    empty = tmp_path / "empty"
    checkpoint(empty, 2, complete=False)
    with caplog.at_level("WARNING"):
        assert resume_point(empty, "last") is None
    assert "no complete checkpoint to resume from" in caplog.text and checkpoint_folders(empty) == []
