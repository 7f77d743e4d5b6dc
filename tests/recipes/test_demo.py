"""The README's main command, ``python recipes/demo.py --output_dir runs/demo``: offline, on the shipped tiny CLIP and
the digits domain shift; a quick in-process run checks the pipeline and its files, one slow run the real default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import demo

REPO = Path(__file__).resolve().parents[2]
LABELS = {"CLIP": "zero-shot CLIP", "Baseline": "source-only", "CMKD": "CMKD", "CMKD+RST": "CMKD+RST"}


def styled_target(data_dir: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The target domain through the digits_test preset written out (32x32 images: resize is the identity)."""
    images, labels = [], []
    for label in range(10):
        for file in sorted((data_dir / "styled" / str(label)).glob("*.png")):
            img = np.asarray(Image.open(file).convert("RGB"), dtype=np.float32) / 255.0
            images.append((img - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@pytest.mark.slow
def test_quick_demo_runs_every_method_and_leaves_adapter_card_and_table(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoImageProcessor

    from cmkd import CLIPAdaptationModel
    from cmkd.toy import DIGITS_PROMPT, TINY_CLIP_PATH

    out = tmp_path / "runs" / "demo"
    results = demo.main(["--output_dir", str(out), "--quick", "--num_workers", "0", "--quiet"])
    printed = capsys.readouterr().out

    assert list(results["methods"]) == ["CLIP", "Baseline", "CMKD", "CMKD+RST"]
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "results.md").is_file() and (out / "accuracy_vs_dsp.png").read_bytes()[:4] == b"\x89PNG"
    adapter = out / "cmkd_rst" / "clean-styled" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (adapter / name).is_file(), name
    assert (out / "data" / "clean").is_dir() and (out / "data" / "styled").is_dir()

    summary = printed[printed.index("target accuracy after") :]
    for method, rows in results["methods"].items():
        entry = rows["clean->styled"]
        line = next(x for x in summary.splitlines() if x.startswith(LABELS[method]))
        assert f"{100 * entry['accuracy']:.1f}%" in line and f"{entry['nbytes']:,}" in line
    rst = results["methods"]["CMKD+RST"]["clean->styled"]
    assert rst["nbytes"] == sum(
        (adapter / f).stat().st_size for f in ("adapter_config.json", "adapter_model.safetensors")
    )

    # the recorded CMKD+RST accuracy is that of the saved adapter on the shipped model, scored by hand
    processor = AutoImageProcessor.from_pretrained(TINY_CLIP_PATH)
    pixels, labels = styled_target(out / "data", processor.image_mean, processor.image_std)
    base = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, [str(d) for d in range(10)], DIGITS_PROMPT)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        hits = (model(pixel_values=pixels).logits.argmax(-1) == labels).tolist()
    assert rst["accuracy"] == sum(hits) / len(hits) and rst["num_eval"] == len(hits)


@pytest.mark.slow
def test_same_command_runs_a_real_benchmark_with_its_yaml(tmp_path):
    """--benchmark office_home --model ... --data_dir ... --source Art --target Clipart: the benchmark's YAML and
    folders (here a tiny CLIP and a tiny Office-Home tree, reduced by --config)."""
    from test_runner import make_office_home, make_tiny_clip, write_small_config  # same folder: shared assets

    clip, data = make_tiny_clip(tmp_path / "clip"), make_office_home(tmp_path / "OfficeHome")
    out = tmp_path / "demo"
    argv = [
        "--output_dir",
        str(out),
        "--benchmark",
        "office_home",
        "--config",
        str(write_small_config(tmp_path / "c.yaml")),
    ]
    argv += ["--model", str(clip), "--data_dir", str(data), "--source", "Art", "--target", "Clipart"]
    results = demo.main([*argv, "--quick", "--batch_size", "4", "--num_workers", "0", "--quiet"])
    assert results["benchmark"] == "office_home" and results["tasks"] == ["Ar->Cl"]
    assert list(results["methods"]) == ["CLIP", "Baseline", "CMKD", "CMKD+RST"]
    assert (out / "cmkd_rst" / "Ar-Cl" / "adapter" / "README.md").is_file()
    assert not (out / "data").exists()  # the toy task is only written for the default benchmark


def test_demo_refuses_single_method_flags_and_finished_folders(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(tmp_path / "a"), "--baseline"])
    assert exc.value.code == 2 and "the demo runs zero-shot, source-only, CMKD and CMKD+RST" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(tmp_path / "a"), "--partial"])
    assert exc.value.code == 2 and "no partial-set protocol" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "results.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--output_dir", str(tmp_path / "b")])
    assert exc.value.code == 2 and "already holds a finished run" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["results.json"]


def test_demo_help_names_the_default_task(capsys):
    with pytest.raises(SystemExit) as exc:
        demo.main(["--help"])
    text = capsys.readouterr().out
    assert exc.value.code == 0 and "--benchmark" in text and "digits_shift" in text and "--quick" in text


@pytest.mark.slow
def test_readme_command_runs_offline_and_cmkd_beats_source_only(tmp_path):
    """The real default command in a fresh process, offline; prints the wall time for the report."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / "demo.py"), "--output_dir", "runs/demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.time() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "demo" / "results.json").read_text())
    accuracy = {m: rows["clean->styled"]["accuracy"] for m, rows in results["methods"].items()}
    print(f"demo wall time {seconds:.0f} s; target accuracy {accuracy}")
    assert accuracy["CMKD"] > accuracy["Baseline"]
    assert accuracy["CMKD+RST"] > accuracy["Baseline"]
    for label in LABELS.values():
        assert label in proc.stdout
