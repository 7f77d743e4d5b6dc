"""The README's main command, ``python recipes/demo.py --output_dir runs/demo``: offline, on the shipped tiny CLIP and
the digits domain shift; a quick in-process run checks the pipeline and its files, one slow run the real default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from recipes import demo

REPO = Path(__file__).resolve().parents[2]
METHODS = ["CLIP", "Baseline", "CMKD", "CMKD+RST"]  # the table's names, also used in the summary, plot and cards
FILES = ("adapter_config.json", "adapter_model.safetensors")


def pixels_of(files, mean, std) -> torch.Tensor:
    """32x32 images normalised by hand (the digits_test preset and CLIPImageProcessor: resize is the identity)."""
    images = [np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0 for f in files]
    mean, std = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return torch.from_numpy((np.stack(images) - mean) / std).permute(0, 3, 1, 2).contiguous()


def styled_target(data_dir: Path, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """The target domain through the digits_test preset written out."""
    from cmkd.toy import TASK_CLASSES

    folders = [data_dir / "styled" / name for name in TASK_CLASSES]
    files = [(f, label) for label, folder in enumerate(folders) for f in sorted(folder.glob("*.png"))]
    return pixels_of([f for f, _ in files], mean, std), torch.tensor([label for _, label in files])


@pytest.mark.slow
def test_quick_demo_runs_every_method_and_leaves_adapter_card_and_table(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoImageProcessor

    from cmkd import CLIPAdaptationModel
    from cmkd.toy import DIGITS_PROMPT, TASK_CLASSES, TINY_CLIP_PATH

    out = tmp_path / "runs" / "demo"
    results = demo.main(["--output_dir", str(out), "--quick", "--seeds", "2", "--dataloader_num_workers", "0"])
    captured = capsys.readouterr()
    printed = captured.out

    assert list(results["methods"]) == METHODS
    assert json.loads((out / "results.json").read_text()) == results
    assert (out / "results.md").is_file() and (out / "accuracy_vs_dsp.png").read_bytes()[:4] == b"\x89PNG"
    # results.md's selection table: per method the last checkpoint, the (here: last) pick, the oracle and the gap
    table = (out / "results.md").read_text()
    assert "Checkpoint selection" in table and "oracle (uses target labels)" in table
    adapter = out / "cmkd_rst" / "seed-42" / "clean-styled" / "adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert (adapter / name).is_file(), name
    assert (out / "data" / "clean").is_dir() and (out / "data" / "styled").is_dir()

    # one "method i of n" line per method; no per-class dicts and no weight-saving bars at the evaluations
    lines = [line for line in printed.splitlines() if line.startswith("method ")]
    assert [line.split(": ")[0] for line in lines] == [f"method {i} of 4" for i in range(1, 5)]
    assert [line.split(": ")[1].split(" (")[0] for line in lines] == METHODS
    assert "per_class" not in printed and "per_class" not in captured.err
    assert "Writing model shards" not in captured.err and "Loading weights" not in captured.err

    # the summary: the table's method names, mean ± std over the seeds, and the selection rule of every number
    summary = printed[printed.index("target accuracy, mean ± std") :]
    for method, rows in results["methods"].items():
        entry = rows["clean->styled"]
        line = next(x for x in summary.splitlines() if x.startswith(method + " "))
        assert f"{100 * entry['accuracy']:.1f} ± {100 * entry['std']:.1f}%" in line and f"{entry['nbytes']:,}" in line
        assert demo.rule_of(entry) in line
        runs = list(entry["runs"].values())
        assert entry["accuracy"] == pytest.approx(float(np.mean(runs)), abs=1e-12)
        assert entry["std"] == pytest.approx(float(np.std(runs)), abs=1e-12)
    assert [len(rows["clean->styled"]["runs"]) for rows in results["methods"].values()] == [1, 2, 2, 2]
    assert results["methods"]["CMKD"]["clean->styled"]["selection"]["rule"] == "last checkpoint (label-free)"
    assert "selection" not in results["methods"]["CLIP"]["clean->styled"]  # zero-shot picks no checkpoint
    assert "oracle" not in summary  # the default needs no target labels
    for line in printed.splitlines():  # every per-seed and per-method accuracy names its rule
        if line.startswith("  ") and "%" in line:
            assert "last checkpoint (label-free)" in line or "no training" in line, line

    rst = results["methods"]["CMKD+RST"]["clean->styled"]
    sizes = [
        sum((out / "cmkd_rst" / seed / "clean-styled" / "adapter" / f).stat().st_size for f in FILES)
        for seed in ("seed-42", "seed-43")
    ]
    assert rst["nbytes"] == round(np.mean(sizes))
    assert 0 <= rst["changed_fraction"] <= 1 and f"{100 * rst['changed_fraction']:.2f}%" in summary

    # the card names a script that exists and builds the base from the shipped model, not from a local path
    card = (adapter / "README.md").read_text()
    assert "`recipes/demo.py`" in card and (REPO / "recipes" / "demo.py").is_file()
    assert "last checkpoint (label-free)" in card
    assert "from_clip(TINY_CLIP_PATH" in card and f"from_clip({str(TINY_CLIP_PATH)!r}" not in card

    # the recorded CMKD+RST accuracy of seed 42 is that of its saved adapter on the shipped model, scored by hand
    processor = AutoImageProcessor.from_pretrained(TINY_CLIP_PATH)
    pixels, labels = styled_target(out / "data", processor.image_mean, processor.image_std)
    base = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, TASK_CLASSES, DIGITS_PROMPT)
    model = PeftModel.from_pretrained(base, adapter).eval()
    with torch.no_grad():
        hits = (model(pixel_values=pixels).logits.argmax(-1) == labels).tolist()
    assert rst["runs"]["42"] == sum(hits) / len(hits) and rst["num_eval"] == len(hits)

    # the saved full model is ready for the image-classification pipeline (the CLIP's image processor is saved with it)
    from transformers import pipeline

    folder = out / "cmkd" / "seed-42" / "clean-styled" / "model"
    files = sorted((out / "data" / "styled" / "3").glob("*.png"))[:4]
    got = [r[0]["label"] for r in pipeline("image-classification", model=str(folder))([str(f) for f in files])]
    adapted = CLIPAdaptationModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = adapted(pixel_values=pixels_of(files, processor.image_mean, processor.image_std)).logits.argmax(-1)
    assert got == [TASK_CLASSES[int(i)] for i in want]


def test_oracle_selection_is_named_as_such(tmp_path, capsys):
    """--selection oracle picks by target accuracy and says so wherever a number is printed."""
    out = tmp_path / "demo"
    args = [
        "--output_dir",
        str(out),
        "--quick",
        "--seeds",
        "1",
        "--selection",
        "oracle",
        "--dataloader_num_workers",
        "0",
    ]
    results = demo.main([*args, "--quiet"])
    printed = capsys.readouterr().out
    sel = results["methods"]["Baseline"]["clean->styled"]["selection"]
    assert sel["rule"] == "oracle (uses target labels)" and sel["gap"] == 0.0  # the oracle is its own best
    summary = printed[printed.index("target accuracy, mean ± std") :]
    assert "checkpoint: oracle (uses target labels)" in summary.splitlines()[0]
    card = (out / "cmkd_rst" / "seed-42" / "clean-styled" / "adapter" / "README.md").read_text()
    assert "oracle (uses target labels)" in card


@pytest.mark.slow
def test_same_command_runs_a_real_benchmark_with_its_yaml(tmp_path):
    """--benchmark office_home --model ... --data_dir ... --source Art --target Clipart: the benchmark's YAML and
    folders (here a tiny CLIP and a tiny Office-Home tree, reduced by --config)."""
    from test_run_uda import make_office_home, make_tiny_clip, write_small_config  # same folder: shared assets

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
    results = demo.main(
        [*argv, "--quick", "--seeds", "1", "--batch_size", "4", "--dataloader_num_workers", "0", "--quiet"]
    )
    assert results["benchmark"] == "office_home" and results["tasks"] == ["Ar->Cl"]
    assert list(results["methods"]) == METHODS
    assert len(list((out / "cmkd_rst").glob("seed-*/Ar-Cl/adapter/README.md"))) == 1  # --seeds 1
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
