"""cmkd.transforms: the release's pipelines by name, picklable for DataLoader workers, timm's RandAugment."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from torchvision import transforms as T
from transformers import CLIPImageProcessor
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from cmkd import make_paired_dataloader, with_image_transform
from cmkd.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    TRANSFORMS,
    ToRGB,
    build_transform,
    image_size_from_processor,
    normalization_from_processor,
    register_transform,
)

RELEASE_NAMES = {
    "office_train",
    "office_test",
    "visda_train",
    "visda_test",
    "digits_train",
    "digits_usps_source",
    "digits_test",
    "fixmatch_strong",
    "clip_train",
    "clip_test",
}


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _image(mode: str = "RGB", size=(20, 26), seed: int = 0) -> PILImage.Image:
    rng = np.random.default_rng(seed)
    return PILImage.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)


def test_clip_normalisation_is_transformers_own():
    assert CLIP_MEAN == tuple(OPENAI_CLIP_MEAN) and CLIP_STD == tuple(OPENAI_CLIP_STD)
    out = build_transform("office_test", 8)(PILImage.new("RGB", (13, 9), (200, 100, 50)))
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), CLIP_MEAN, CLIP_STD)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(RELEASE_NAMES))
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_every_release_transform_gives_a_normalised_square_rgb_tensor(name, mode):
    assert RELEASE_NAMES <= set(TRANSFORMS)
    _seed_all(0)
    size = (20, 20) if name.startswith("digits") else (20, 26)  # the digits pipelines assume square digits (release)
    out = build_transform(name, 16)(_image(mode, size))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("name", sorted(RELEASE_NAMES))
def test_every_transform_survives_a_pickle_round_trip(name):
    transform = build_transform(name, 16)
    copy = pickle.loads(pickle.dumps(transform))
    image = _image()
    for seed in range(3):
        _seed_all(seed)
        expected = transform(image)
        _seed_all(seed)
        assert torch.equal(copy(image), expected)


def test_office_and_digits_train_are_the_release_pipelines_written_out():
    image = _image(size=(30, 22))
    tail = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    office = T.Compose([T.Resize((18, 18)), T.RandomCrop(16), T.RandomHorizontalFlip(), *tail])
    digits = T.Compose([T.RandomResizedCrop(16, scale=(0.75, 1.2)), *tail])
    for name, reference in (("office_train", office), ("digits_train", digits)):
        for seed in range(4):
            _seed_all(seed)
            expected = reference(image)
            _seed_all(seed)
            assert torch.equal(build_transform(name, 16)(image), expected), name


def test_fixmatch_strong_uses_timms_release_rand_augment():
    from timm.data.auto_augment import RandAugment

    stages = build_transform("fixmatch_strong", 224).transforms
    (ra,) = [t for t in stages if isinstance(t, RandAugment)]
    assert ra.num_layers == 2 and ra.choice_weights is None
    assert {op.magnitude for op in ra.ops} == {10} and {op.prob for op in ra.ops} == {0.5}
    assert {op.magnitude_std for op in ra.ops} == {0.5}
    assert {op.hparams["translate_const"] for op in ra.ops} == {int(224 * 0.45)}
    assert [type(t) for t in stages[:5]] == [ToRGB, T.Resize, T.CenterCrop, T.RandomHorizontalFlip, T.ColorJitter]
    jitter = stages[4]
    assert jitter.brightness == (0.6, 1.4) and jitter.hue is None
    # it is random: two draws of one image differ
    image = _image(size=(32, 32))
    strong = build_transform("fixmatch_strong", 32)
    assert not torch.equal(strong(image), strong(image))


def test_bad_names_sizes_and_normalisation_are_clear_errors():
    with pytest.raises(ValueError, match="unknown transform 'office'.*office_train"):
        build_transform("office")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            build_transform("office_test", size)
    with pytest.raises(ValueError, match="3 values"):
        build_transform("office_test", 16, mean=(0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        build_transform("office_test", 16, std=(0.2, 0.0, 0.2))


def test_register_transform_makes_a_name_usable_and_refuses_duplicates():
    def gray_test(size, mean, std):
        return [T.Grayscale(3), T.Resize((size, size)), T.ToTensor(), T.Normalize(mean, std)]

    before = dict(TRANSFORMS)
    with pytest.raises(ValueError, match="already registered"):
        register_transform("office_test", gray_test)
    with pytest.raises(TypeError, match="callable"):
        register_transform("x", "not a builder")
    assert TRANSFORMS == before  # refused: registry unchanged
    try:
        register_transform("gray_test", gray_test)
        out = build_transform("gray_test", 8)(_image())
        assert out.shape == (3, 8, 8) and torch.equal(out[0], out[1]) is False  # normalised per channel
    finally:
        TRANSFORMS.pop("gray_test", None)


def test_normalisation_and_size_from_an_image_processor():
    processor = CLIPImageProcessor(crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3)
    assert normalization_from_processor(processor) == ((0.5,) * 3, (0.25,) * 3)
    assert image_size_from_processor(processor) == 32
    assert normalization_from_processor(None) == (CLIP_MEAN, CLIP_STD)
    assert image_size_from_processor(None, default=16) == 16


def _dataset(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    return Dataset.from_dict({"image": images, "label": [i % 2 for i in range(n)]}, features=features)


def test_spawned_dataloader_workers_receive_every_transform():
    """spawn pickles the dataset with its transforms (a lambda would fail here); seeded items make the 2-worker
    batches equal to the in-process ones."""
    source = with_image_transform(_dataset(8, 0), build_transform("office_train", 16))
    target = with_image_transform(
        _dataset(8, 1), build_transform("digits_train", 16), strong_transform=build_transform("fixmatch_strong", 16)
    )
    pickle.loads(pickle.dumps(source)), pickle.loads(pickle.dumps(target))

    def batches(**kwargs):
        loader = make_paired_dataloader(source, target, source_batch_size=2, seed=3, **kwargs)
        iterator = iter(loader)
        return [next(iterator) for _ in range(4)]

    inline = batches()
    spawned = batches(num_workers=2, multiprocessing_context="spawn")
    for a, b in zip(inline, spawned):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
