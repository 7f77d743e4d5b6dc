"""Recipes under faults and bad input: one-line errors before anything heavy is loaded, diverged runs that record
nothing, resumes that skip half-written checkpoints, and README commands that run as written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from test_run_uda import argv, make_office_home, make_tiny_clip, write_small_config  # same folder: shared assets
from transformers import TrainerCallback

from recipes import digits, office_home, run_uda
from recipes.core import outputs

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fault_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a model, tokenizer or processor is loaded: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the cheap inputs were checked")

    for name in ("AutoModel", "AutoTokenizer", "AutoImageProcessor"):
        monkeypatch.setattr(getattr(transformers, name), "from_pretrained", refuse)


def recipe_error(main, args, capsys) -> tuple[int, str]:
    """Run a recipe as its __main__ does; return (exit status, the one-line message)."""
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(main, args)
    code = exc.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # SystemExit("error: ...") prints the message and exits with 1
        return 1, code
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    return code, lines[-1] if lines else err


def one_line(message: str) -> None:
    assert "\n" not in message.strip() and "Traceback" not in message and ".." not in message, message


# ----------------------------------------------------------------------------------------------------------------
# Item 3: README commands, cheap checks first, Hub ids that cannot be loaded
# ----------------------------------------------------------------------------------------------------------------


def test_recipe_without_output_dir_writes_to_the_documented_default(assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    flags = ["--config", str(assets["config"]), "--data_dir", str(assets["data"]), "--model", str(assets["clip"])]
    flags += ["--dataloader_num_workers", "0", "--quiet", "--zero-shot"]
    office_home.main([*flags, "--source", "Art", "--target", "Clipart"])
    assert (tmp_path / "runs/office_home/clip/Ar-Cl/results.json").is_file()
    office_home.main([*flags, "--all"])
    results = json.loads((tmp_path / "runs/office_home/clip/all/results.json").read_text())
    assert sorted(results["methods"]["CLIP"]) == ["Ar->Cl", "Cl->Ar", "Pr->Re"]


@pytest.mark.parametrize("benchmark", ["office_home", "digits"])
def test_missing_data_is_reported_before_any_model_is_loaded(tmp_path, no_model_loading, capsys, benchmark):
    main = {"office_home": office_home, "digits": digits}[benchmark].main
    task = ["-s", "Ar", "-t", "Cl"] if benchmark == "office_home" else ["-s", "U", "-t", "M"]
    common = ["--output_dir", str(tmp_path / "out"), *task]  # the default --model is a Hub id: never reached
    code, message = recipe_error(main, ["--data_dir", str(tmp_path / "nothing"), *common], capsys)
    assert code == 1 and message.startswith(f"error: --data_dir {tmp_path / 'nothing'} does not exist")
    if benchmark == "office_home":
        (tmp_path / "oh" / "Art" / "chair").mkdir(parents=True)  # Clipart is missing
        code, message = recipe_error(main, ["--data_dir", str(tmp_path / "oh"), *common], capsys)
        assert code == 1 and "domain Cl (Clipart) not found" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--target_dir", "--target_list", "--eval_dir", "--eval_list"])
def test_missing_custom_target_is_reported_before_any_model_is_loaded(
    assets, tmp_path, no_model_loading, capsys, flag
):
    """A target given by --target_*/--eval_* is checked with the benchmark's domains, not skipped (nor a KeyError)."""
    args = ["--config", str(assets["config"]), "--data_dir", str(assets["data"]), "--model", str(assets["clip"])]
    args += ["--output_dir", str(tmp_path / "out"), "--source", "Art", flag, str(tmp_path / "nothing")]
    code, message = recipe_error(office_home.main, args, capsys)
    assert code == 1 and message.startswith(f"error: {flag} {tmp_path / 'nothing'} does not exist"), message
    one_line(message)
    assert not (tmp_path / "out").exists()


def test_unwritable_output_dir_is_reported_before_any_model_is_loaded(assets, tmp_path, no_model_loading, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, message = recipe_error(office_home.main, argv(assets, blocker / "out"), capsys)
    assert code == 2 and "cannot be created" in message and str(blocker) in message


def test_hub_model_not_cached_offline_is_an_immediate_error(assets, tmp_path, monkeypatch, capsys, no_model_loading):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    args = [*argv(assets, tmp_path / "out"), "--model", "openai/clip-vit-base-patch16"]
    code, message = recipe_error(office_home.main, args, capsys)
    assert code == 1 and message.startswith("error: cannot load CLIP 'openai/clip-vit-base-patch16': it is not in the")
    assert "run once with network access" in message and "HF_HUB_OFFLINE=1" in message
    one_line(message)


class CountingServer:
    """A TCP port on localhost that accepts and drops every connection (a Hub that cannot be reached)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self):
        self.sock.close()


def test_unreachable_hub_fails_after_one_request_not_a_retry_loop(assets, tmp_path):
    """transformers retries an unreachable Hub with back-off (~45 s); the recipe asks once and explains.

    In a fresh interpreter: an upload earlier in the same process (tests/peft_rst/test_hub.py) leaves huggingface_hub
    in a state where the next request fails before it connects, which would hide what this test counts."""
    server = CountingServer()
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": server.url, "HF_HUB_CACHE": str(tmp_path / "cache")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    args = [*argv(assets, tmp_path / "out"), "--model", "openai/clip-vit-base-patch16"]
    try:
        proc = subprocess.run(
            [sys.executable, str(REPO / "recipes" / "office_home.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        server.close()
    message = next((line for line in proc.stderr.splitlines() if "error:" in line), proc.stderr[-2000:])
    assert proc.returncode == 1 and "it is not in the local Hugging Face cache" in message
    assert f"{server.url} cannot be reached" in message
    # one metadata request (a fresh interpreter's huggingface_hub may retry a dropped connection once), where
    # transformers' loop retries with back-off for ~45 s
    assert 1 <= server.connections <= 2
    one_line(message)


def test_library_messages_ending_in_a_period_are_not_doubled(assets, tmp_path, capsys):
    """torchvision's "Dataset not found." + the recipe's own sentence gave "..": messages are joined cleanly."""
    (tmp_path / "digits").mkdir()
    args = ["--data_dir", str(tmp_path / "digits"), "-s", "M", "-t", "U", "--output_dir", str(tmp_path / "o")]
    args += ["--model", str(assets["clip"]), "--dataloader_num_workers", "0"]
    code, message = recipe_error(digits.main, args, capsys)
    assert "MNIST (train) not found or unreadable" in message and "Dataset not found" in message
    assert ".." not in message


# ----------------------------------------------------------------------------------------------------------------
# Item 8: a diverged run stops, records nothing and keeps the last good checkpoint
# ----------------------------------------------------------------------------------------------------------------


class PoisonHead(TrainerCallback):
    """A NaN in the task head before step ``step``: that step's loss is non-finite."""

    def __init__(self, step: int):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            core = model.get_base_model() if hasattr(model, "get_base_model") else model
            with torch.no_grad():
                core.head.classifier.weight.view(-1)[0] = float("nan")


@pytest.mark.parametrize("rst", [False, True])
def test_diverged_run_stops_with_a_message_and_records_no_result(assets, tmp_path, capsys, rst):
    out = tmp_path / "run"
    flags = ["--rst", "--tau", "1e-3"] if rst else []
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(office_home.main, argv(assets, out, *flags, iterations=4), callbacks=[PoisonHead(3)])
    message = str(exc.value.code)
    assert message.startswith("error: training diverged at step 3: non-finite source cross-entropy")
    assert f"the last good checkpoint is {out / 'Ar-Cl' / 'checkpoint-2'}" in message
    one_line(message.replace("1e+30", ""))
    task = out / "Ar-Cl"
    assert sorted(p.name for p in task.iterdir()) == ["checkpoint-2"]  # no adapter/model, no task result
    assert not (out / "results.json").exists()


def test_lr_1e30_is_stopped_not_recorded(assets, tmp_path, capsys):
    out = tmp_path / "run"
    code, message = recipe_error(
        office_home.main, argv(assets, out, "--rst", "--tau", "1e-3", "--learning_rate", "1e30"), capsys
    )
    assert code == 1 and "training diverged at step" in message and "Lower the learning rate (now 1e+30)" in message
    assert not (out / "results.json").exists() and not (out / "Ar-Cl" / "adapter").exists()


# ----------------------------------------------------------------------------------------------------------------
# Items 10 / 11: complete checkpoints, orphans, --all --resume_from_checkpoint
# ----------------------------------------------------------------------------------------------------------------


class StopAtSave(TrainerCallback):
    """Ctrl-C right after the ``n``-th checkpoint of the run (counted over tasks)."""

    def __init__(self, n: int):
        self.n, self.saves = n, 0

    def on_save(self, args, state, control, **kwargs):
        self.saves += 1
        if self.saves == self.n:
            raise KeyboardInterrupt(f"stopped after {args.output_dir}/checkpoint-{state.global_step}")


def test_all_with_resume_keeps_finished_tasks_resumes_started_ones_and_starts_new_ones(assets, tmp_path, caplog):
    out = tmp_path / "all"
    flags = ["--all", "--baseline", "--logging_steps", "1", "--keep_checkpoints"]
    with pytest.raises(KeyboardInterrupt):  # task 1 finished, task 2 at checkpoint-2, task 3 never started
        office_home.main(argv(assets, out, *flags, iterations=4, task=None), callbacks=[StopAtSave(3)])
    first = out / "Ar-Cl" / outputs.TASK_RESULT_FILENAME
    assert first.is_file() and (out / "Cl-Ar" / "checkpoint-2").is_dir() and not (out / "Pr-Re").exists()
    stamp = first.stat().st_mtime_ns
    with caplog.at_level("WARNING"):
        results = office_home.main(argv(assets, out, *flags, "--resume_from_checkpoint", iterations=4, task=None))
    assert sorted(results["methods"]["Baseline"]) == ["Ar->Cl", "Cl->Ar", "Pr->Re"]
    assert first.stat().st_mtime_ns == stamp
    assert f"{out / 'Pr-Re'} has no complete checkpoint to resume from; starting from scratch" in caplog.text
    state = json.loads((out / "Cl-Ar" / "checkpoint-4" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3, 4]
    assert (out / "Cl-Ar" / outputs.TASK_RESULT_FILENAME).is_file()


def test_resume_skips_and_removes_a_half_written_checkpoint(assets, tmp_path, caplog):
    out = tmp_path / "run"
    flags = ["--baseline", "--keep_checkpoints"]
    with pytest.raises(KeyboardInterrupt):
        office_home.main(argv(assets, out, *flags, iterations=6), callbacks=[StopAtSave(2)])
    task = out / "Ar-Cl"
    (task / "checkpoint-4" / "trainer_state.json").unlink()  # the save of step 4 was killed before its last file
    with caplog.at_level("WARNING"):
        office_home.main(argv(assets, out, *flags, "--resume_from_checkpoint", iterations=6))
    assert "skipping incomplete checkpoint" in caplog.text and "no trainer_state.json" in caplog.text
    state = json.loads((task / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (task / "checkpoint-4" / "trainer_state.json").is_file()  # redone


def test_orphans_of_a_killed_final_save_are_removed(assets, tmp_path):
    out = tmp_path / "run"
    task = out / "Ar-Cl"
    (task / ".adapter.tmp-x1y2").mkdir(parents=True)
    (task / ".adapter.tmp-x1y2" / "adapter_model.safetensors").write_bytes(b"half")
    (task / ".task_result.json.abc.tmp").write_text("{")
    out.joinpath(".results.json.def.tmp").write_text("{")
    office_home.main(argv(assets, out, "--zero-shot"))
    assert sorted(p.name for p in task.iterdir()) == [outputs.TASK_RESULT_FILENAME]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# ----------------------------------------------------------------------------------------------------------------
# Item 14: one-line errors instead of tracebacks
# ----------------------------------------------------------------------------------------------------------------


def test_batch_larger_than_a_domain_is_a_usage_error(assets, tmp_path, capsys):
    args = argv(assets, tmp_path / "o", "--baseline")
    args[args.index("--batch_size") + 1] = "13"  # each tiny domain has 12 images
    code, message = recipe_error(office_home.main, args, capsys)
    assert code == 2 and "--batch_size 13 is larger than the source domain Ar (12 images)" in message
    assert "pass --batch_size 12 or less" in message
    one_line(message)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--logging_steps", "0"], "--logging_steps must be a finite number > 0, got 0.0"),
        (["--seed", "-1"], "--seed must be an integer in [0, 4.29497e+09], got -1"),
        (["--rst", "--tau", "nan"], "--tau must be a finite number > 0, got nan"),
        (["--learning_rate", "nan"], "--learning_rate must be a finite number > 0, got nan"),
        (["--learning_rate", "-0.1"], "--learning_rate must be a finite number > 0, got -0.1"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(assets, tmp_path, capsys, no_model_loading, flags, message):
    code, text = recipe_error(office_home.main, argv(assets, tmp_path / "o", *flags), capsys)
    assert code == 2 and message in text
    assert not (tmp_path / "o").exists()


def test_resume_from_a_folder_that_is_not_a_checkpoint(assets, tmp_path, capsys, no_model_loading):
    folder = tmp_path / "task"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    code, message = recipe_error(
        office_home.main, argv(assets, tmp_path / "o", "--resume_from_checkpoint", str(folder)), capsys
    )
    assert (
        code == 2
        and f"--resume_from_checkpoint '{folder}' is not a complete checkpoint (no trainer_state.json" in message
    )
    code, message = recipe_error(
        office_home.main,
        argv(assets, tmp_path / "o", "--resume_from_checkpoint", str(folder / "checkpoint-2")),
        capsys,
    )
    assert code == 2 and "no model weights" in message and "no optimizer.pt" in message


def test_push_while_offline_is_a_usage_error(assets, tmp_path, monkeypatch, capsys, no_model_loading):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    args = argv(assets, tmp_path / "o", "--rst", "--push_to_hub", "--hub_token", "hf_x")
    code, message = recipe_error(office_home.main, args, capsys)
    assert code == 2 and "--push_to_hub needs the network, but HF_HUB_OFFLINE=1 is set" in message


def test_push_to_an_unreachable_endpoint_is_a_clear_error(assets, tmp_path, monkeypatch, capsys):
    import httpx2

    import peft_rst

    def unreachable(folder, repo_id, **kwargs):
        httpx2.get("http://127.0.0.1:9/api/repos/create")  # the ConnectError huggingface_hub lets through

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(peft_rst, "push_adapter_to_hub", unreachable)
    out = tmp_path / "run"
    args = argv(
        assets, out, "--rst", "--tau", "1e-3", "--push_to_hub", "--hub_token", "hf_x", "--hub_model_id", "me/a"
    )
    code, message = recipe_error(office_home.main, args, capsys)
    assert code == 1 and message.startswith(f"error: could not push {out / 'Ar-Cl' / 'adapter'} to me/a on ")
    assert "ConnectError" in message and "--resume_from_checkpoint to push it" in message
    assert "hf upload me/a" in message
    one_line(message)
    assert (out / "Ar-Cl" / "adapter" / "adapter_model.safetensors").is_file()
    # the retry: nothing is trained again, the push happens, the task is finished
    pushed = []
    monkeypatch.setattr(peft_rst, "push_adapter_to_hub", lambda folder, repo, **kw: pushed.append(repo))
    results = office_home.main([*args, "--resume_from_checkpoint"])
    assert pushed == ["me/a"] and results["methods"]["CMKD+RST"]["Ar->Cl"]["hub_repo"] == "me/a"
