"""The embedded default: the digits domain shift and the shipped tiny CLIP, through the real HF code paths."""

from __future__ import annotations

import json
import os

import datasets
import huggingface_hub
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from transformers import (
    AutoImageProcessor,
    AutoProcessor,
    AutoTokenizer,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from cmkd.toy import (
    DIGIT_CLASSES,
    DIGITS_PROMPT,
    TASK_CLASSES,
    TINY_CLIP_PATH,
    make_digits_shift,
    needs_render,
    render_digits,
    sample_styles,
    split_digit_pools,
    write_digits_shift_imagefolder,
)

# OpenAI CLIP normalisation, written out here (not imported) as the independent reference.
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Everything here must work without the Hub: make any attempt to reach it fail."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def shift():
    return make_digits_shift(seed=0)


@pytest.fixture(scope="module")
def shipped():
    return CLIPModel.from_pretrained(TINY_CLIP_PATH).eval(), AutoTokenizer.from_pretrained(TINY_CLIP_PATH)


def as_array(images) -> np.ndarray:
    """PIL images -> (N, H, W, 3) float array in [0, 1]."""
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.float64) / 255 for im in images])


def manual_pixels(images) -> torch.Tensor:
    return torch.tensor(((as_array(images) - CLIP_MEAN) / CLIP_STD).transpose(0, 3, 1, 2), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- shipped model
def test_shipped_folder_is_small_and_loads_through_every_auto_class(shipped):
    files = {p.name: p.stat().st_size for p in TINY_CLIP_PATH.iterdir()}
    assert "model.safetensors" in files and "README.md" in files and "training_metadata.json" in files
    assert sum(files.values()) < 3 * 2**20
    model, tokenizer = shipped
    assert model.config.vision_config.image_size == 32
    assert isinstance(tokenizer, CLIPTokenizer)
    assert isinstance(CLIPProcessor.from_pretrained(TINY_CLIP_PATH), CLIPProcessor)
    assert isinstance(AutoProcessor.from_pretrained(TINY_CLIP_PATH), CLIPProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(TINY_CLIP_PATH), CLIPImageProcessor)


def test_processor_matches_clip_normalisation_and_model_shapes(shipped, shift):
    model, _ = shipped
    processor = CLIPProcessor.from_pretrained(TINY_CLIP_PATH)
    images = list(shift["target"]["image"][:4])
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (4, 3, 32, 32)
    torch.testing.assert_close(pixels, manual_pixels(images), atol=1e-5, rtol=0)

    prompts = [DIGITS_PROMPT.format(c) for c in DIGIT_CLASSES]
    text = processor(text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = model.get_text_features(**text).pooler_output
    assert img.shape == (4, model.config.projection_dim) and txt.shape == (10, model.config.projection_dim)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_tokenizer_frames_prompts_and_falls_back_to_bytes(shipped):
    _, tokenizer = shipped
    ids = tokenizer([DIGITS_PROMPT.format(c) for c in DIGIT_CLASSES])["input_ids"]
    assert all(x[0] == tokenizer.bos_token_id and x[-1] == tokenizer.eos_token_id for x in ids)
    assert len({tuple(x) for x in ids}) == 10  # the class is visible to the text tower
    # A word never seen in a caption still encodes losslessly (byte symbols), not as the unknown token.
    unseen = tokenizer("zebra crossing")["input_ids"][1:-1]
    assert tokenizer.unk_token_id not in unseen
    assert "".join(tokenizer.convert_ids_to_tokens(unseen)).replace("</w>", " ").strip() == "zebra crossing"


def zero_shot_predictions(model, tokenizer, dataset, names=DIGIT_CLASSES) -> np.ndarray:
    text = tokenizer([DIGITS_PROMPT.format(c) for c in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        txt = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        img = F.normalize(model.get_image_features(pixel_values=manual_pixels(dataset["image"])).pooler_output, dim=-1)
    return (img @ txt.T).argmax(-1).numpy()


def zero_shot(model, tokenizer, dataset, names=DIGIT_CLASSES) -> float:
    return float((zero_shot_predictions(model, tokenizer, dataset, names) == np.asarray(dataset["label"])).mean())


def test_zero_shot_teacher_is_useful_but_imperfect_on_the_target(shipped, shift):
    torch.manual_seed(0)
    model, tokenizer = shipped
    source, target = zero_shot(model, tokenizer, shift["source"]), zero_shot(model, tokenizer, shift["target"])
    # Chance is 10 %. The design asks for a teacher in roughly 60-85 % on the target and better on clean digits.
    assert source >= 0.85
    assert 0.6 <= target <= 0.9
    assert target < source


def test_task_names_two_classes_the_teacher_cannot_name(shipped, shift):
    """The demo task's label names (TASK_CLASSES) leave the zero-shot teacher blind on classes 8 and 9 only."""
    model, tokenizer = shipped
    labels = np.asarray(shift["source"]["label"])
    pred = zero_shot_predictions(model, tokenizer, shift["source"], TASK_CLASSES)
    known, renamed = labels < 8, labels >= 8
    assert TASK_CLASSES[:8] == DIGIT_CLASSES[:8] and TASK_CLASSES[8:] != DIGIT_CLASSES[8:]
    assert (pred[known] == labels[known]).mean() >= 0.85  # the names pretraining used still work
    assert (pred[renamed] == labels[renamed]).mean() <= 0.3  # names it never read do not
    # with the pretraining's own names the same model knows 8 and 9 on the source
    pred_digits = zero_shot_predictions(model, tokenizer, shift["source"])
    assert (pred_digits[renamed] == labels[renamed]).mean() >= 0.85


# ----------------------------------------------------------------------------------------------- data
def test_pools_are_disjoint_stratified_and_cover_the_digits():
    pools = split_digit_pools()
    labels = load_digits().target
    all_idx = np.concatenate(list(pools.values()))
    assert len(all_idx) == len(set(all_idx.tolist())) == len(labels)
    for c in range(10):
        n = int((labels == c).sum())
        counts = {name: int((labels[idx] == c).sum()) for name, idx in pools.items()}
        assert abs(counts["pretrain"] - n / 2) <= 1 and abs(counts["source"] - n / 4) <= 1


def test_rows_are_the_pool_digits_and_never_pretraining_ones(shift):
    pools = split_digit_pools()
    raw = load_digits()
    for role in ("source", "target"):
        assert list(shift[role]["label"]) == raw.target[pools[role]].tolist()
        assert shift[role].features["label"].names == TASK_CLASSES
    # Independent check on the clean source: each image's nearest bilinear upsampling among all 1797 digits is
    # the pool digit of that row, so it is not a pretraining digit.
    clean = torch.tensor(as_array(shift["source"]["image"])[..., 0], dtype=torch.float32)
    ups = F.interpolate(torch.tensor(raw.images / 16, dtype=torch.float32)[:, None], size=32, mode="bilinear")[:, 0]
    nearest = torch.cdist(clean.flatten(1), ups.flatten(1)).argmin(1).numpy()
    np.testing.assert_array_equal(nearest, pools["source"])
    assert not set(nearest.tolist()) & set(pools["pretrain"].tolist())


def test_domains_differ_visibly(shift):
    src, tgt = as_array(shift["source"]["image"]), as_array(shift["target"]["image"])
    assert src.shape[1:] == tgt.shape[1:] == (32, 32, 3)
    # Source: grey-scale white on black, black corners. Target: coloured, lit backgrounds, varied brightness.
    assert np.abs(src - src[..., :1]).max() == 0 and src[:, :2, :2].max() == 0
    assert np.abs(tgt - tgt.mean(-1, keepdims=True)).mean() > 0.05
    assert tgt[:, :2, :2].mean() > 0.2
    assert tgt.mean(axis=(1, 2, 3)).std() > 3 * src.mean(axis=(1, 2, 3)).std()


def test_styles_are_deterministic_per_seed(shift):
    again, other = make_digits_shift(seed=0), make_digits_shift(seed=1)
    np.testing.assert_array_equal(as_array(again["target"]["image"]), as_array(shift["target"]["image"]))
    np.testing.assert_array_equal(as_array(other["source"]["image"]), as_array(shift["source"]["image"]))
    changed = np.abs(as_array(other["target"]["image"]) - as_array(shift["target"]["image"])).max(axis=(1, 2, 3))
    assert (changed > 0.1).mean() > 0.95


def test_render_is_batch_independent_and_rejects_bad_input():
    digits = torch.tensor(load_digits().images[:6] / 16, dtype=torch.float32)
    styles = sample_styles("styled", 6, torch.Generator().manual_seed(3))
    whole = render_digits(digits, styles)
    part = render_digits(digits[2:4], {k: v[2:4] for k, v in styles.items()})
    torch.testing.assert_close(part, whole[2:4])
    with pytest.raises(ValueError, match="shape"):
        render_digits(digits.flatten(1), styles)
    with pytest.raises(ValueError, match="Unknown style"):
        sample_styles("sepia", 2)


# ----------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_round_trips_through_load_dataset(tmp_path, shift):
    root = write_digits_shift_imagefolder(tmp_path / "task", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # no temporary directory left behind
    pools = split_digit_pools()
    for role, domain in (("source", "clean"), ("target", "styled")):
        loaded = datasets.load_dataset(
            "imagefolder", data_dir=str(root / domain), split="train", cache_dir=str(tmp_path / "cache")
        )
        assert loaded.features["label"].names == TASK_CLASSES
        assert len(loaded) == len(shift[role])
        row_of = {int(idx): i for i, idx in enumerate(pools[role])}
        files = sorted((root / domain).glob("*/*.png"))
        for path in files[::37]:  # a spread-out sample of files
            i = row_of[int(path.stem)]
            assert path.parent.name == TASK_CLASSES[shift[role][i]["label"]]
            np.testing.assert_array_equal(np.asarray(Image.open(path)), np.asarray(shift[role][i]["image"]))
        assert sorted(zip(loaded["label"], [as_array([im]).sum() for im in loaded["image"]])) == sorted(
            zip(shift[role]["label"], [as_array([im]).sum() for im in shift[role]["image"]])
        )


def test_imagefolder_is_idempotent_and_refuses_foreign_directories(tmp_path):
    root = write_digits_shift_imagefolder(tmp_path / "task", seed=0)
    stamp = os.stat(root).st_mtime_ns
    assert write_digits_shift_imagefolder(root, seed=0) == root and os.stat(root).st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="seed=1"):
        write_digits_shift_imagefolder(root, seed=1)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(FileExistsError):
        write_digits_shift_imagefolder(tmp_path / "other")


def test_an_older_render_of_the_task_is_replaced(tmp_path):
    root = write_digits_shift_imagefolder(tmp_path / "task", seed=0)
    assert not needs_render(root)
    marker = root / ".digits_shift.json"
    old = json.loads(marker.read_text())
    marker.write_text(json.dumps(old | {"version": old["version"] - 1}))
    (root / "clean" / "9").mkdir()  # what version 1 named class 9
    assert needs_render(root)
    assert write_digits_shift_imagefolder(root, seed=0) == root
    assert json.loads(marker.read_text()) == old and not needs_render(root)
    assert sorted(p.name for p in (root / "clean").iterdir()) == sorted(TASK_CLASSES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]  # nothing left aside
    # another seed's render is not stale, it is someone else's folder: refused, untouched
    marker.write_text(json.dumps(old | {"version": old["version"] - 1, "seed": 1}))
    assert not needs_render(root)
    with pytest.raises(FileExistsError):
        write_digits_shift_imagefolder(root, seed=0)
    assert (root / "clean" / "acht").is_dir()


def test_imagefolder_write_is_atomic_on_failure(tmp_path, monkeypatch):
    calls = {"n": 0}
    original = Image.Image.save

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_digits_shift_imagefolder(tmp_path / "task")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a half-written temporary directory
