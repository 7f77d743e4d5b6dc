"""kill -9 at random (seeded) points of a recipe run, including inside checkpoint saves and the final adapter save,
then ``--resume_from_checkpoint``: the run that finally completes must equal an uninterrupted one bitwise (final
adapter tensors, results row), with nothing half-written left on disk.

Each run is a child process forked from the test (no second interpreter start-up): a patch installed only in the
child sends it SIGKILL at the chosen point of the save path, or the test kills it after a seeded random delay. Same
machine, same process setup, one thread: bitwise equality is the right bar.
"""

from __future__ import annotations

import io
import json
import os
import random
import select
import shutil
import signal
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_run_uda import argv, make_office_home, make_tiny_clip, write_small_config  # same folder: shared assets
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState

from recipes import office_home
from recipes.core import outputs

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")

FLAGS = ["--rst", "--tau", "1e-3", "--logging_steps", "1"]
ITERATIONS, SAVES = 4, 2  # checkpoints at steps 2 and 4 (argv's --eval_steps 2)
SEED = 20261130


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _nth(n: int):
    calls = {"n": 0}

    def hit() -> bool:
        calls["n"] += 1
        return calls["n"] == n

    return hit


# Kill points, each installed in the child only. ``n``: which checkpoint save of this run (1-based).
def kill_before_rng_state(n: int) -> None:
    """Weights and optimizer of checkpoint n written, RNG state and trainer_state.json not."""
    original, hit = Trainer._save_rng_state, _nth(n)

    def patched(self, output_dir):
        if hit():
            _die()
        return original(self, output_dir)

    Trainer._save_rng_state = patched


def kill_in_optimizer_write(n: int) -> None:
    """optimizer.pt of checkpoint n torn in the middle of the write."""
    original, hit = Trainer._save_optimizer_and_scheduler, _nth(n)

    def patched(self, output_dir):
        if hit():
            buf = io.BytesIO()
            torch.save(self.optimizer.state_dict(), buf)
            with open(os.path.join(output_dir, "optimizer.pt"), "wb") as fh:
                fh.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            _die()
        return original(self, output_dir)

    Trainer._save_optimizer_and_scheduler = patched


def kill_in_trainer_state_write(n: int) -> None:
    """trainer_state.json of checkpoint n (the Trainer's last file) torn in the middle of the write."""
    original, hit = TrainerState.save_to_json, _nth(n)

    def patched(self, json_path):
        if "checkpoint-" in str(json_path) and hit():
            with open(json_path, "w") as fh:
                fh.write(json.dumps({"global_step": self.global_step, "log_history": []})[:25])
            _die()
        return original(self, json_path)

    TrainerState.save_to_json = patched


def kill_in_final_adapter_save(_: int) -> None:
    """The adapter is written into its temp folder, the model card is not: an orphan .adapter.tmp-* folder."""
    import peft_rst

    peft_rst.write_model_card = lambda *args, **kwargs: _die()


def kill_before_task_result(_: int) -> None:
    """The adapter is in place, the task's finished marker is not."""
    original = outputs.atomic_write_text

    def patched(path, text):
        if Path(path).name == outputs.TASK_RESULT_FILENAME:
            _die()
        return original(path, text)

    outputs.atomic_write_text = patched


def kill_between_adapter_swap_renames(_: int) -> None:
    """Replacing an existing adapter: the old one moved aside, the new one not yet moved in (no adapter at all)."""
    original = os.replace

    def patched(src, dst):
        if Path(src).name.startswith(".adapter.tmp-") and not Path(dst).exists():
            _die()
        return original(src, dst)

    os.replace = patched


class TrainingStarted(TrainerCallback):
    def __init__(self, fd: int):
        self.fd = fd

    def on_train_begin(self, args, state, control, **kwargs):
        if self.fd is not None:
            try:
                os.write(self.fd, b"s")
            except OSError:  # nobody is waiting for it
                pass
            os.close(self.fd)
            self.fd = None


def run_child(
    args: list[str], kill=None, n: int = 1, delay: float | None = None, timing: list[float] | None = None
) -> int:
    """Run the recipe in a forked child; returns the signal that ended it (negative) or its exit status.

    ``delay``: SIGKILL that long after training starts; ``timing``: gets the seconds from training start to exit."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_fd)
            if kill is not None:
                kill(n)
            office_home.main(args, callbacks=[TrainingStarted(write_fd)])
            code = 0
        except BaseException:  # noqa: BLE001 - reported through the exit status
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_fd)
    started = None
    if delay is not None or timing is not None:
        ready, _, _ = select.select([read_fd], [], [], 300)
        if ready and os.read(read_fd, 1):
            started = time.monotonic()
            if delay is not None:
                time.sleep(delay)
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if timing is not None and started is not None:
        timing.append(time.monotonic() - started)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def complete_step(task: Path) -> int:
    from cmkd.checkpoints import complete_checkpoints

    done, _ = complete_checkpoints(task)
    return int(done[-1].name.split("-")[-1]) if done else 0


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob(".*"))


def adapter(out: Path) -> dict:
    return load_file(out / "Ar-Cl" / "adapter" / "adapter_model.safetensors")


def row(out: Path) -> dict:
    entry = json.loads((out / "results.json").read_text())["methods"]["CMKD+RST"]["Ar->Cl"]
    return {k: v for k, v in entry.items() if k != "path"}


@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(assets, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    rng = random.Random(SEED)
    straight = tmp_path / "straight"
    timing: list[float] = []
    assert run_child(argv(assets, straight, *FLAGS, iterations=ITERATIONS), timing=timing) == 0

    out = tmp_path / "killed"
    task = out / "Ar-Cl"
    first = argv(assets, out, *FLAGS, iterations=ITERATIONS)
    resume = [*first, "--resume_from_checkpoint"]
    # 1. at a random time (seeded) in the first half of the uninterrupted run's training + saving time, so that the
    # run still has checkpoint saves ahead for the kill points below (a fixed delay outlasts a fast machine's run)
    delay = rng.uniform(0, 0.5) * timing[0]
    assert run_child(first, delay=delay) == -signal.SIGKILL, delay

    def saves_ahead() -> bool:  # a finished task removes its checkpoints, so look at its result file too
        return complete_step(task) < ITERATIONS and not (task / outputs.TASK_RESULT_FILENAME).exists()

    for _ in range(4):  # a loaded machine can still finish every checkpoint save before the kill: kill earlier
        if saves_ahead():
            break
        shutil.rmtree(out)
        delay /= 4
        assert run_child(first, delay=delay) == -signal.SIGKILL, delay
    assert saves_ahead(), f"every kill at {delay:.3f}s came after the last checkpoint save"
    seen = [("random time", delay, complete_step(task), leftovers(out))]
    # 2. inside the save path: checkpoint n (random among those the run still makes), then the final save
    chain = [kill_before_rng_state, kill_in_optimizer_write, kill_in_trainer_state_write]
    chain += [kill_in_final_adapter_save, kill_before_task_result, kill_between_adapter_swap_renames]
    for kill in chain:
        left = SAVES - complete_step(task) // 2  # checkpoint saves the next run makes
        n = rng.randint(1, left) if left else 1
        status = run_child(resume, kill, n)
        assert status == -signal.SIGKILL, f"{kill.__name__}: the child was not killed (status {status})"
        seen.append((kill.__name__, n, complete_step(task), leftovers(out)))
    # what the kills left behind, so the resumes had something to cope with
    assert any(".adapter.tmp-" in x for *_, left in seen for x in left), seen  # killed final save
    assert any(".adapter.old-" in x for *_, left in seen for x in left), seen  # killed swap of an existing adapter
    assert not (out / "results.json").exists()

    assert run_child(resume) == 0
    assert leftovers(out) == [] and not list(task.glob("checkpoint-*"))
    a, b = adapter(straight), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), seen
    assert row(out) == row(straight)
