"""Labelling new images with a trained model: ``python -m cmkd predict`` and ``transformers.pipeline``, on a saved
``CLIPAdaptationModel`` folder and on a CLIP base + RST adapter, with generated images and corrupt files."""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from cmkd import CLIPAdaptationModel
from cmkd.__main__ import main as cli
from cmkd.predict import collect_images
from cmkd.toy import (
    DIGIT_CLASSES,
    DIGITS_PROMPT,
    TINY_CLIP_PATH,
    digits_to_pil,
    load_digit_pools,
    render_digits,
    sample_styles,
)

REPO = Path(__file__).resolve().parents[2]
# OpenAI CLIP normalisation written out (not imported): the independent reference preprocessing for 32x32 images.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


def manual_pixels(files) -> torch.Tensor:
    arr = np.stack([np.asarray(Image.open(f).convert("RGB"), dtype=np.float64) / 255 for f in files])
    return torch.tensor(((arr - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2), dtype=torch.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, list[Path]]:
    """7 styled digits as PNG/JPEG in a folder tree, a corrupt PNG, a truncated PNG and a text file."""
    root = tmp_path_factory.mktemp("images")
    digits, _ = load_digit_pools()["target"]
    rendered = digits_to_pil(render_digits(digits[:7], sample_styles("styled", 7, torch.Generator().manual_seed(5))))
    good = []
    for i, image in enumerate(rendered):
        folder = root / ("a" if i < 4 else "b/c")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i}.{'png' if i % 3 else 'jpg'}"
        image.save(path)
        good.append(path)
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    whole = (root / "a" / "img1.png").read_bytes()
    (root / "b" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "a" / "notes.txt").write_text("not an image, skipped when a folder is searched")
    return {"root": [root], "good": good, "bad": [root / "a" / "broken.png", root / "b" / "truncated.png"]}


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    """A CLIPAdaptationModel with a random (non-zero) head, saved with the CLIP's image processor."""
    torch.manual_seed(0)
    model = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, DIGIT_CLASSES, DIGITS_PROMPT)
    with torch.no_grad():
        model.head.classifier.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    AutoImageProcessor.from_pretrained(TINY_CLIP_PATH).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def rst_adapter(tmp_path_factory):
    """An RST adapter on the shipped tiny CLIP with some backbone entries changed and a random head."""
    from peft import get_peft_model

    from peft_rst import RSTConfig

    torch.manual_seed(1)
    base = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, DIGIT_CLASSES, DIGITS_PROMPT)
    model = get_peft_model(base, RSTConfig(tau=1e-4, modules_to_save=["head"]))
    with torch.no_grad():
        layers = [m for m in model.modules() if hasattr(m, "rst_weight")]
        for layer in layers[:3]:
            for weight in layer.rst_weight["default"].values():
                weight.view(-1)[::7] += 0.3
        head = model.base_model.model.head.modules_to_save["default"]
        head.classifier.weight.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder, model.eval()


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def reference_topk(model, files, k):
    with torch.no_grad():
        probs = model(pixel_values=manual_pixels(files)).logits.softmax(-1)
    scores, ids = probs.topk(k, dim=-1)
    return [
        [(DIGIT_CLASSES[i], s) for i, s in zip(r_ids, r_scores)]
        for r_ids, r_scores in zip(ids.tolist(), scores.tolist())
    ]


def check_rows(rows, files, expected, k):
    by_path = {row["path"]: row for row in rows}
    for file, labels in zip(files, expected):
        row = by_path[str(file)]
        assert row["error"] == ""
        assert [row[f"label_{i}"] for i in range(1, k + 1)] == [label for label, _ in labels]
        np.testing.assert_allclose(
            [float(row[f"score_{i}"]) for i in range(1, k + 1)], [s for _, s in labels], atol=2e-5
        )


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_labels_a_folder_with_a_saved_model_and_lists_corrupt_files(saved_model, images, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    assert (
        cli(
            [
                "predict",
                "--model",
                str(saved_model),
                *map(str, images["root"]),
                "--output",
                str(out),
                "--top_k",
                "3",
                "--batch_size",
                "2",
                "--progress",
                "false",
            ]
        )
        == 0
    )
    rows = read_csv(out)
    assert list(rows[0]) == ["path", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3", "error"]
    # every image file under the folder (sorted, recursive), the text file skipped
    assert [r["path"] for r in rows] == [str(p) for p in collect_images(images["root"])]
    assert len(rows) == len(images["good"]) + len(images["bad"])
    model = CLIPAdaptationModel.from_pretrained(saved_model).eval()
    check_rows(rows, images["good"], reference_topk(model, images["good"], 3), 3)
    bad = {r["path"]: r for r in rows if r["error"]}
    assert set(bad) == {str(p) for p in images["bad"]}
    assert all(r["label_1"] == "" and "Error" in r["error"] for r in bad.values())
    captured = capsys.readouterr()
    assert f"{len(images['good'])} images labelled, 2 unreadable; wrote {out}" in captured.out
    assert "broken.png" in captured.err and "truncated.png" in captured.err


def test_batch_size_and_input_order_do_not_change_predictions(saved_model, images, tmp_path):
    files = [images["good"][3], images["bad"][0], images["good"][0], images["good"][5]]
    outs = []
    for batch in (1, 3, 64):
        out = tmp_path / f"b{batch}.csv"
        cli(
            [
                "predict",
                "--model",
                str(saved_model),
                *map(str, files),
                "--output",
                str(out),
                "--batch_size",
                str(batch),
                "--progress",
                "false",
            ]
        )
        outs.append(read_csv(out))
    assert [r["path"] for r in outs[0]] == [str(f) for f in files]  # files given one by one keep their order
    for other in outs[1:]:
        assert [r["label_1"] for r in other] == [r["label_1"] for r in outs[0]]
        np.testing.assert_allclose(
            [float(r["score_1"] or 0) for r in other], [float(r["score_1"] or 0) for r in outs[0]], atol=1e-5
        )


def test_cli_with_rst_adapter_on_a_clip_base(rst_adapter, images, tmp_path):
    folder, model = rst_adapter
    out = tmp_path / "preds.csv"
    argv = ["predict", "--model", str(TINY_CLIP_PATH), "--adapter", str(folder), *map(str, images["good"])]
    argv += ["--class_names", ",".join(DIGIT_CLASSES), "--prompt_template", DIGITS_PROMPT, "--output", str(out)]
    cli([*argv, "--top_k", "2", "--progress", "false"])
    rows = read_csv(out)
    check_rows(rows, images["good"], reference_topk(model, images["good"], 2), 2)
    # the adapter matters: the base alone labels the images differently
    base = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, DIGIT_CLASSES, DIGITS_PROMPT).eval()
    with torch.no_grad():
        base_scores = base(pixel_values=manual_pixels(images["good"])).logits.softmax(-1).max(-1).values
    assert not np.allclose(base_scores.numpy(), [float(r["score_1"]) for r in rows], atol=1e-3)


def test_cli_refuses_bad_arguments_and_leaves_the_output_alone(saved_model, rst_adapter, images, tmp_path, capsys):
    out = tmp_path / "preds.csv"
    out.write_text("previous run\n")
    with pytest.raises(SystemExit) as exc:  # a CLIP base without the class names the adapter's head was trained on
        cli(
            [
                "predict",
                "--model",
                str(TINY_CLIP_PATH),
                "--adapter",
                str(rst_adapter[0]),
                str(images["good"][0]),
                "--output",
                str(out),
            ]
        )
    assert "--class_names and --prompt_template" in str(exc.value)
    with pytest.raises(SystemExit, match="without a trained task head"):  # not a random CLIPForImageClassification
        cli(["predict", "--model", str(TINY_CLIP_PATH), str(images["good"][0]), "--output", str(out)])
    with pytest.raises(SystemExit) as exc:
        cli(["predict", "--model", str(saved_model), "--output", str(out)])
    assert exc.value.code == 2 and "at least one image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli(["predict", "--model", str(saved_model), str(images["good"][0]), "--top_k", "0"])
    assert exc.value.code == 2 and "--top_k must be >= 1" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit, match="no image files found"):
        cli(["predict", "--model", str(saved_model), str(empty), "--output", str(out)])
    assert out.read_text() == "previous run\n"
    assert cli(["frobnicate"]) == 2


def test_python_dash_m_runs_offline(saved_model, images, tmp_path):
    out = tmp_path / "preds.csv"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cmkd",
            "predict",
            "--model",
            str(saved_model),
            str(images["good"][0]),
            str(images["bad"][0]),
            "--output",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "1 images labelled, 1 unreadable" in proc.stdout
    assert "predict" in proc.stderr  # the tqdm progress bar
    assert [r["error"] == "" for r in read_csv(out)] == [True, False]


# ----------------------------------------------------------------------------------------------- pipeline
def test_pipeline_works_on_a_saved_folder_and_on_a_peft_model(saved_model, rst_adapter, images, caplog):
    from peft import PeftModel
    from transformers import pipeline

    import peft_rst  # noqa: F401

    files = [str(f) for f in images["good"]]
    with caplog.at_level(logging.ERROR, logger="transformers"):
        classify = pipeline("image-classification", model=str(saved_model), device="cpu")
    assert not [r for r in caplog.records if "not supported" in r.getMessage()]
    model = CLIPAdaptationModel.from_pretrained(saved_model).eval()
    got = classify(files, top_k=3)
    expected = reference_topk(model, images["good"], 3)
    for result, labels in zip(got, expected):
        assert [r["label"] for r in result] == [label for label, _ in labels]
        np.testing.assert_allclose([r["score"] for r in result], [s for _, s in labels], atol=2e-5)

    folder, in_memory = rst_adapter
    base = CLIPAdaptationModel.from_clip(TINY_CLIP_PATH, DIGIT_CLASSES, DIGITS_PROMPT)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    classify = pipeline(
        "image-classification", model=peft_model, image_processor=AutoImageProcessor.from_pretrained(TINY_CLIP_PATH)
    )
    got = classify(files, top_k=2)
    for result, labels in zip(got, reference_topk(in_memory, images["good"], 2)):
        assert [r["label"] for r in result] == [label for label, _ in labels]
        np.testing.assert_allclose([r["score"] for r in result], [s for _, s in labels], atol=2e-5)
