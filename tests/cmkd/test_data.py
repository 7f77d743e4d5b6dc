"""Paired source/target streams, transforms, class-list checks, partial-set estimation and the UDA metric."""

import random

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from cmkd.data import (
    CLIP_MEAN,
    CLIP_STD,
    PairedInfiniteBatchSampler,
    check_class_lists,
    collate_images,
    dataset_class_names,
    image_transform,
    item_seed,
    make_paired_dataloader,
    with_image_transform,
)
from cmkd.fixmatch import strong_transform
from cmkd.metrics import load_uda_accuracy
from cmkd.partial import class_counts, estimate_label_set
from cmkd.transforms import build_transform

NAMES = ["cat", "dog", "bird"]


def _image_dataset(n: int, seed: int = 0, size: int = 16) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    return Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


# ----------------------------------------------------------------------------------------------- sampler
def test_each_stream_is_an_endless_reshuffled_pass_without_tail():
    sampler = PairedInfiniteBatchSampler(10, 3, target_size=7, target_batch_size=2, seed=5)
    batches = _take(iter(sampler), 9)
    source = [[i for s, i, *_ in b if s == "source"] for b in batches]
    target = [[i for s, i, *_ in b if s == "target"] for b in batches]
    assert all(len(b) == 3 for b in source) and all(len(b) == 2 for b in target)
    # 10 // 3 = 3 batches per source pass (one sample dropped), each pass a set of distinct indices
    for p in range(3):
        chunk = sum(source[3 * p : 3 * p + 3], [])
        assert len(set(chunk)) == 9 and set(chunk) <= set(range(10))
    # 7 // 2 = 3 batches per target pass
    for p in range(3):
        chunk = sum(target[3 * p : 3 * p + 3], [])
        assert len(set(chunk)) == 6 and set(chunk) <= set(range(7))
    passes = [tuple(sum(source[3 * p : 3 * p + 3], [])) for p in range(3)]
    assert len(set(passes)) > 1, "every pass must be reshuffled"


def test_sampler_is_deterministic_per_seed():
    first = _take(iter(PairedInfiniteBatchSampler(20, 4, 20, 4, seed=1)), 6)
    again = _take(iter(PairedInfiniteBatchSampler(20, 4, 20, 4, seed=1)), 6)
    other = _take(iter(PairedInfiniteBatchSampler(20, 4, 20, 4, seed=2)), 6)
    assert first == again and first != other


def test_replicas_split_exactly_the_single_process_global_batches():
    single = _take(iter(PairedInfiniteBatchSampler(23, 6, 17, 4, seed=3)), 8)
    rank0 = _take(iter(PairedInfiniteBatchSampler(23, 3, 17, 2, seed=3, num_replicas=2, rank=0)), 8)
    rank1 = _take(iter(PairedInfiniteBatchSampler(23, 3, 17, 2, seed=3, num_replicas=2, rank=1)), 8)
    for whole, a, b in zip(single, rank0, rank1):
        for stream in ("source", "target"):
            expected = [(i, n, p) for s, i, n, p in whole if s == stream]
            got = [(i, n, p) for s, i, n, p in a if s == stream] + [(i, n, p) for s, i, n, p in b if s == stream]
            assert got == expected  # same items, batch numbers and global positions


def test_sampler_rejects_datasets_smaller_than_a_global_batch():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairedInfiniteBatchSampler(5, 3, num_replicas=2)
    with pytest.raises(ValueError, match="target dataset has 3 examples"):
        PairedInfiniteBatchSampler(10, 2, target_size=3, target_batch_size=4)


# ----------------------------------------------------------------------------------------------- loaders
def test_paired_dataloader_yields_labeled_source_and_unlabeled_target():
    torch.manual_seed(0)
    transform = image_transform(16, train=False)
    source = with_image_transform(_image_dataset(12), transform)
    target = with_image_transform(_image_dataset(9, seed=1), transform, strong_transform=strong_transform(16))
    loader = make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"source_pixel_values", "source_labels", "target_pixel_values", "target_strong_pixel_values"}
    assert batch["source_pixel_values"].shape == (4, 3, 16, 16)
    assert batch["target_pixel_values"].shape == (3, 3, 16, 16)
    assert batch["target_strong_pixel_values"].shape == (3, 3, 16, 16)
    assert batch["source_labels"].dtype == torch.long
    # the labels are those of the sampled rows
    indices = [key[1] for key in next(iter(loader.batch_sampler)) if key[0] == "source"]
    assert batch["source_labels"].tolist() == [i % 3 for i in indices]


def test_source_only_loader_has_no_target_keys():
    source = with_image_transform(_image_dataset(8), image_transform(16, train=False))
    batch = next(iter(make_paired_dataloader(source, None, source_batch_size=4)))
    assert set(batch) == {"source_pixel_values", "source_labels"}


def test_unlabeled_source_is_an_error():
    unlabeled = with_image_transform(_image_dataset(8).remove_columns("label"), image_transform(16, train=False))
    with pytest.raises(ValueError, match="source dataset must be labeled"):
        next(iter(make_paired_dataloader(unlabeled, None, source_batch_size=4)))


def test_eval_transform_matches_hand_normalisation():
    pixels = np.arange(16 * 16 * 3, dtype=np.uint8).reshape(16, 16, 3)
    out = image_transform(16, train=False)(PILImage.fromarray(pixels))
    expected = (torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / (
        torch.tensor(CLIP_STD)[:, None, None]
    )
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_train_transform_and_strong_view_shapes():
    torch.manual_seed(0)
    image = PILImage.fromarray(np.full((20, 24, 3), 128, dtype=np.uint8))
    assert image_transform(16, train=True)(image).shape == (3, 16, 16)
    assert strong_transform(16)(image).shape == (3, 16, 16)


def test_collate_errors_are_clear():
    with pytest.raises(ValueError, match="pixel_values"):
        collate_images([{"image": 1}])
    with pytest.raises(ValueError, match="no label"):
        collate_images([{"pixel_values": torch.zeros(3, 2, 2), "labels": None}])


# ----------------------------------------------------------------------------------------------- class lists
def test_class_names_are_read_from_classlabel():
    assert dataset_class_names(_image_dataset(3)) == NAMES
    assert dataset_class_names(with_image_transform(_image_dataset(3), image_transform(16, False))) == NAMES


def test_check_class_lists():
    check_class_lists(NAMES, NAMES, NAMES)
    check_class_lists(NAMES, None, None)
    with pytest.raises(ValueError, match=r"missing \['bird'\], unexpected \['cow'\]"):
        check_class_lists(NAMES, ["cat", "dog", "cow"], None)
    with pytest.raises(ValueError, match="different order"):
        check_class_lists(NAMES, ["dog", "cat", "bird"], None)
    with pytest.raises(ValueError, match="partial_set=True"):
        check_class_lists(NAMES, NAMES, ["cat", "dog"])
    check_class_lists(NAMES, NAMES, ["cat", "dog"], partial=True)
    with pytest.raises(ValueError, match="label ids differ"):
        check_class_lists(NAMES, NAMES, ["dog", "bird"], partial=True)
    with pytest.raises(ValueError, match="does not know"):
        check_class_lists(NAMES, NAMES, ["cat", "cow"], partial=True)
    with pytest.raises(ValueError, match="empty"):
        check_class_lists(NAMES, [], None)
    with pytest.raises(ValueError, match="empty"):
        check_class_lists([], None, None)


# ----------------------------------------------------------------------------------------------- partial set
def test_label_set_keeps_classes_predicted_at_least_threshold_times():
    predictions = [0] * 14 + [1] * 13 + [3] * 20
    assert class_counts(predictions, 5).tolist() == [14, 13, 0, 20, 0]
    assert estimate_label_set(predictions, 5, threshold=14).tolist() == [0, 3]
    assert estimate_label_set(predictions, 5, threshold=13).tolist() == [0, 1, 3]


def test_label_set_falls_back_to_all_classes_when_none_qualify():
    assert estimate_label_set([0, 1], 4, threshold=14).tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="class ids"):
        estimate_label_set([7], 4)


# ----------------------------------------------------------------------------------------------- metric
def test_uda_accuracy_metric_matches_hand_counts():
    metric = load_uda_accuracy()
    preds = [0, 0, 1, 2, 2, 2, 1]
    refs = [0, 1, 1, 2, 2, 0, 1]
    out = metric.compute(predictions=preds, references=refs, num_classes=4)
    # class 0: 1/2, class 1: 2/3, class 2: 2/2, class 3 absent
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["per_class_accuracy"] == [pytest.approx(0.5), pytest.approx(2 / 3), 1.0, None]
    assert out["mean_class_accuracy"] == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)
    with pytest.raises(ValueError, match="missing labels"):
        metric.compute(predictions=[0], references=[-1])


# ----------------------------------------------------------------------------------------------- seeded augmentation
def _augmented_sets():
    """Source and target whose every view is random (crop, flip, timm RandAugment, colour jitter)."""
    source = with_image_transform(_image_dataset(12, size=20), build_transform("office_train", 16))
    target = with_image_transform(
        _image_dataset(10, seed=1, size=20),
        build_transform("digits_train", 16),
        strong_transform=build_transform("fixmatch_strong", 16),
    )
    return source, target


def _first(loader, n: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def _same_batches(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


def _rng_states():
    return torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()


def test_seeded_augmentation_is_the_same_with_any_number_of_workers_and_any_global_rng():
    source, target = _augmented_sets()
    inline = _first(make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=5), 5)
    torch.manual_seed(123), random.seed(123), np.random.seed(123)  # what the caller's generators hold is irrelevant
    workers = make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=5, num_workers=2)
    assert _same_batches(_first(workers, 5), inline)
    other_seed = make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=6)
    assert not _same_batches(_first(other_seed, 5), inline)
    # without seeding the augmentation follows the global generators: the same loader gives other batches
    unseeded = make_paired_dataloader(
        source, target, source_batch_size=4, target_batch_size=3, seed=5, seed_augmentation=False
    )
    assert not _same_batches(_first(unseeded, 5), _first(unseeded, 5))


def test_each_item_is_augmented_from_seed_stream_batch_number_and_position_alone():
    source, target = _augmented_sets()
    raw_source, raw_target = _image_dataset(12, size=20), _image_dataset(10, seed=1, size=20)
    loader = make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=5)
    keys = _first(iter(loader.batch_sampler), 3)
    weak, strong = build_transform("digits_train", 16), build_transform("fixmatch_strong", 16)
    for number, (batch, batch_keys) in enumerate(zip(_first(loader, 3), keys)):
        for stream, index, key_number, position in batch_keys:
            assert key_number == number
            # the reference: seed the three generators by hand and transform the raw image
            s = item_seed(5, stream, number, position)
            torch.default_generator.manual_seed(s), random.seed(s), np.random.seed(s & 0xFFFFFFFF)
            if stream == "source":
                expected = build_transform("office_train", 16)(raw_source[index]["image"])
                assert torch.equal(batch["source_pixel_values"][position], expected)
            else:
                view = weak(raw_target[index]["image"])
                assert torch.equal(batch["target_pixel_values"][position], view)
                assert torch.equal(batch["target_strong_pixel_values"][position], strong(raw_target[index]["image"]))


class _PlainDataset(torch.utils.data.Dataset):
    """A map-style dataset that is not a `with_image_transform` view: PairedDataset seeds it item by item."""

    def __init__(self, raw, transform, strong=None):
        self.raw, self.transform, self.strong = raw, transform, strong

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        row = self.raw[i]
        item = {"pixel_values": self.transform(row["image"]), "labels": row["label"]}
        if self.strong is not None:
            item["pixel_values_strong"] = self.strong(row["image"])
        return item


def test_any_map_style_dataset_gets_the_same_seeded_items():
    source, target = _augmented_sets()
    plain_source = _PlainDataset(_image_dataset(12, size=20), build_transform("office_train", 16))
    plain_target = _PlainDataset(
        _image_dataset(10, seed=1, size=20),
        build_transform("digits_train", 16),
        build_transform("fixmatch_strong", 16),
    )
    hf = _first(make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=3, seed=5), 3)
    plain = _first(
        make_paired_dataloader(plain_source, plain_target, source_batch_size=4, target_batch_size=3, seed=5), 3
    )
    assert _same_batches(plain, hf)


def test_loading_seeded_items_leaves_the_callers_generators_untouched():
    source, target = _augmented_sets()
    loader = make_paired_dataloader(source, target, source_batch_size=4, seed=5)
    keys = next(iter(loader.batch_sampler))
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    before = _rng_states()
    items = loader.dataset.__getitems__(keys)  # what a worker (or the main process) runs per batch
    after = _rng_states()
    assert len(items) == len(keys)
    assert torch.equal(before[0], after[0]) and before[1] == after[1] and (before[2] == after[2]).all()


def test_a_fast_forwarded_stream_continues_with_the_uninterrupted_batches():
    from accelerate import skip_first_batches

    source, target = _augmented_sets()
    make = lambda: make_paired_dataloader(source, target, source_batch_size=4, seed=5)  # noqa: E731
    full = _first(make(), 6)
    resumed = _first(skip_first_batches(make(), 3), 3)  # a new loader, as in a resumed process
    assert _same_batches(resumed, full[3:])


def test_two_processes_see_the_single_process_augmented_global_batch():
    source, target = _augmented_sets()
    single = _first(make_paired_dataloader(source, target, source_batch_size=4, target_batch_size=2, seed=5), 3)
    ranks = [
        _first(
            make_paired_dataloader(
                source, target, source_batch_size=2, target_batch_size=1, seed=5, num_replicas=2, rank=r
            ),
            3,
        )
        for r in (0, 1)
    ]
    for whole, a, b in zip(single, *ranks):
        for key in whole:
            assert torch.equal(torch.cat([a[key], b[key]]), whole[key]), key


def _trainer_run(output_dir, workers: int, resume: str | None = None, save: bool = False) -> dict:
    from tiny_clip_models import CharTokenizer, tiny_clip

    from cmkd import CLIPAdaptationModel, CMKDTrainer, CMKDTrainingArguments

    source = with_image_transform(_image_dataset(16, size=36), build_transform("office_train", 32))
    target = with_image_transform(_image_dataset(16, seed=1, size=36), build_transform("office_train", 32))
    torch.manual_seed(1)
    model = CLIPAdaptationModel.from_clip(tiny_clip(), NAMES, "a photo of a {}.", tokenizer=CharTokenizer())
    args = CMKDTrainingArguments(
        output_dir=str(output_dir),
        max_steps=4,
        iterations_per_epoch=4,  # checkpoint-2 is in the middle of an "epoch"
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        eval_strategy="no",
        save_strategy="steps" if save else "no",
        save_steps=2,
        save_total_limit=None,
        load_best_model_at_end=False,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=7,
        dataloader_num_workers=workers,
    )
    CMKDTrainer(model, args, source, target).train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_trainer_resumed_mid_epoch_with_workers_ends_bitwise_like_one_uninterrupted_run(tmp_path):
    straight = _trainer_run(tmp_path / "straight", workers=0, save=True)
    with_workers = _trainer_run(tmp_path / "workers", workers=2)
    resumed = _trainer_run(tmp_path / "resumed", workers=2, resume=str(tmp_path / "straight" / "checkpoint-2"))
    for name, value in straight.items():
        assert torch.equal(with_workers[name], value), f"{name}: 2 workers differ from 0 workers"
        assert torch.equal(resumed[name], value), f"{name}: the resumed run differs"
