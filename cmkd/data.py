"""Data plumbing for UDA training: image transforms, a labeled source stream paired with an unlabeled target stream.

The release trains by iterations: every step draws one source batch and one target batch, each from its own
endless, reshuffled stream (a new permutation whenever a pass is used up; the last incomplete batch of a pass is
dropped). `make_paired_dataloader` builds exactly that as an ordinary `torch.utils.data.DataLoader` whose batch
sampler never ends, so workers, pinning and prefetching work as usual and `accelerate.skip_first_batches` can
fast-forward it when a run resumes.

Distributed runs share one *global* batch: every process draws the same permutations (same seed) and takes its
own slice, so N processes with per-device batch B see exactly the batches one process with batch N*B sees.

Seeded augmentation: the batch sampler numbers every key ``(stream, index, batch_number, position)``, position being
the place in the *global* batch, and `PairedDataset` loads each item with the random generators (torch CPU, python
``random``, numpy) seeded from `item_seed` of that key. An item's augmentation is then a function of (seed, stream,
batch number, position) alone: a resumed run (the Trainer fast-forwards the sampler), any number of DataLoader
workers and any number of processes see exactly the batches of one uninterrupted single-process run.
"""

from __future__ import annotations

import contextvars
import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .image_sets import open_rgb
from .transforms import CLIP_MEAN, CLIP_STD, ToRGB, build_transform

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "PairedDataset",
    "PairedInfiniteBatchSampler",
    "check_class_lists",
    "collate_images",
    "dataset_class_names",
    "image_transform",
    "item_seed",
    "make_paired_dataloader",
    "with_image_transform",
]

SOURCE, TARGET = "source", "target"


# ----------------------------------------------------------------------------------------------- transforms
def image_transform(
    image_size: int,
    train: bool,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    resize_size: int | None = None,
) -> Callable:
    """PIL image -> normalised tensor (3, image_size, image_size), the release's Office-Home style pipeline.

    train: RGB, Resize((r, r)) with r = resize_size or image_size * 256 / 224, RandomCrop, HorizontalFlip, normalise
    (``cmkd.transforms.build_transform("office_train")``). eval: RGB, Resize((image_size, image_size)), normalise
    (``"office_test"``). Other release pipelines: `cmkd.transforms.TRANSFORMS`.
    """
    if not train or resize_size is None:
        return build_transform("office_train" if train else "office_test", image_size, mean, std)
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(tuple(mean), tuple(std))]
    r = int(resize_size)
    return T.Compose([ToRGB(), T.Resize((r, r)), T.RandomCrop(image_size), T.RandomHorizontalFlip(), *tail])


def with_image_transform(
    dataset,
    transform: Callable,
    strong_transform: Callable | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
):
    """A `datasets.Dataset` view yielding ``{"pixel_values", "labels"?, "pixel_values_strong"?}`` (lazy, batched).

    Images may be PIL images or undecoded ``Image(decode=False)`` values (`cmkd.image_sets`): those are read as RGB
    by `cmkd.image_sets.open_rgb` when the item is fetched, so an unreadable file is named.

    ``strong_transform`` adds the FixMatch strong view of the same image (see `cmkd.fixmatch`). Set
    ``label_column=None`` (or leave it absent from the data) for an unlabeled target set.
    """
    names = getattr(dataset, "column_names", None)
    if names is None:
        raise TypeError(f"with_image_transform expects a datasets.Dataset, got {type(dataset).__name__}.")
    if image_column not in names:
        raise ValueError(f"dataset has no {image_column!r} column (columns: {names}); pass image_column=.")
    has_labels = label_column is not None and label_column in names
    return dataset.with_transform(
        ImageTransformer(transform, strong_transform, image_column, label_column if has_labels else None)
    )


class ImageTransformer:
    """The batched formatting function of `with_image_transform`: a class, so the dataset pickles for workers."""

    def __init__(
        self,
        transform: Callable,
        strong_transform: Callable | None = None,
        image_column: str = "image",
        label_column: str | None = "label",
    ) -> None:
        self.transform, self.strong_transform = transform, strong_transform
        self.image_column, self.label_column = image_column, label_column

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        images = batch[self.image_column]
        seeds = _BATCH_ITEM_SEEDS.get()  # set by PairedDataset: seed per image inside one batched fetch
        if seeds is not None and len(seeds) != len(images):
            raise RuntimeError(f"{len(seeds)} item seeds for a batch of {len(images)} images.")
        weak, strong = [], []
        for j, image in enumerate(images):
            image = open_rgb(image) if isinstance(image, dict) else image  # Image(decode=False): {"path", "bytes"}
            if seeds is not None:
                _seed_generators(seeds[j])
            weak.append(self.transform(image))
            if self.strong_transform is not None:
                strong.append(self.strong_transform(image))
        out: dict[str, Any] = {"pixel_values": weak}
        if self.strong_transform is not None:
            out["pixel_values_strong"] = strong
        if self.label_column is not None:
            out["labels"] = batch[self.label_column]
        return out


# ----------------------------------------------------------------------------------------------- class lists
def dataset_class_names(dataset, label_column: str = "label") -> list[str] | None:
    """Class names of a dataset if it declares them (`datasets.ClassLabel` feature or a ``classes`` attribute)."""
    features = getattr(dataset, "features", None)
    if features is not None:
        for column in (label_column, "labels", "label"):
            names = getattr(features.get(column), "names", None) if column in features else None
            if names is not None:
                return list(names)
    classes = getattr(dataset, "classes", None)
    return list(classes) if classes is not None else None


def check_class_lists(
    model_classes: Sequence[str],
    source_classes: Sequence[str] | None,
    target_classes: Sequence[str] | None,
    partial: bool = False,
) -> None:
    """Raise a clear error if the datasets' class lists do not match the model's.

    The source must have exactly the model's classes in the same order. The target must match too, or for
    partial-set DA (``partial=True``) be a subset whose label ids agree with the model's (align a relabelled target
    with ``dataset.align_labels_with_mapping(model.config.label2id, "label")``).
    """
    model_classes = list(model_classes)
    if not model_classes:
        raise ValueError("the model has an empty class list; build it with the source dataset's class names.")
    if source_classes is not None:
        source_classes = list(source_classes)
        if not source_classes:
            raise ValueError("the source dataset declares an empty class list.")
        if source_classes != model_classes:
            raise ValueError(_mismatch("source dataset", source_classes, model_classes))
    if target_classes is not None:
        target_classes = list(target_classes)
        if not target_classes:
            raise ValueError("the target dataset declares an empty class list.")
        if target_classes == model_classes:
            return
        if not partial:
            raise ValueError(
                _mismatch("target dataset", target_classes, model_classes)
                + " If the target has only a subset of the classes, this is partial-set DA: set partial_set=True."
            )
        extra = [c for c in target_classes if c not in model_classes]
        if extra:
            raise ValueError(f"partial-set target has classes the model does not know: {extra}.")
        if target_classes != model_classes[: len(target_classes)]:
            raise ValueError(
                "partial-set target classes are a subset of the model's but their label ids differ; relabel with "
                "target.align_labels_with_mapping(model.config.label2id, 'label')."
            )


def _mismatch(what: str, got: list[str], expected: list[str]) -> str:
    missing = [c for c in expected if c not in got]
    extra = [c for c in got if c not in expected]
    detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else "same classes in a different order"
    return (
        f"{what} class list does not match the model's ({len(got)} vs {len(expected)} classes: {detail}). "
        "Build the model from the source dataset's class names, in label order."
    )


# ----------------------------------------------------------------------------------------------- collation
def collate_images(examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack ``pixel_values`` (and ``pixel_values_strong``) and turn ``labels``/``label`` into a LongTensor."""
    if not examples:
        raise ValueError("cannot collate an empty batch.")
    first = examples[0]
    if not isinstance(first, dict) or "pixel_values" not in first:
        raise ValueError(
            "dataset items must be dicts with a 'pixel_values' tensor (use cmkd.data.with_image_transform), "
            f"got {type(first).__name__}" + (f" with keys {sorted(first)}" if isinstance(first, dict) else "") + "."
        )
    batch = {"pixel_values": torch.stack([torch.as_tensor(e["pixel_values"]) for e in examples])}
    if "pixel_values_strong" in first:
        batch["pixel_values_strong"] = torch.stack([torch.as_tensor(e["pixel_values_strong"]) for e in examples])
    key = "labels" if "labels" in first else "label" if "label" in first else None
    if key is not None:
        labels = [e[key] for e in examples]
        if any(label is None for label in labels):
            raise ValueError("some examples have no label (None); labeled data is required here.")
        batch["labels"] = torch.as_tensor(labels, dtype=torch.long)
    return batch


# ----------------------------------------------------------------------------------------------- paired stream
def item_seed(seed: int, stream: str, batch_number: int, position: int) -> int:
    """The seed item ``position`` (in the global batch) of ``stream`` in batch ``batch_number`` is augmented with.

    A hash, not arithmetic, so neighbouring items, batches and seeds get unrelated random streams."""
    digest = hashlib.blake2b(f"{seed}/{stream}/{batch_number}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# the item seeds of the batch a PairedDataset is fetching from a `with_image_transform` dataset (one batched call)
_BATCH_ITEM_SEEDS: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("cmkd_item_seeds", default=None)


def _seed_generators(value: int) -> None:
    torch.default_generator.manual_seed(value)
    random.seed(value)
    np.random.seed(value & 0xFFFFFFFF)


def _formatted_by_image_transformer(dataset) -> bool:
    """A `with_image_transform` dataset: its batched fetch can seed every image itself (no per-item fetches)."""
    fmt = getattr(dataset, "format", None)
    transform = fmt.get("format_kwargs", {}).get("transform") if isinstance(fmt, dict) else None
    return isinstance(transform, ImageTransformer) and hasattr(dataset, "__getitems__")


class _SeededRandomness:
    """Seeds torch's CPU generator, python's ``random`` and numpy's global generator for one item, and restores all
    three afterwards, so the caller's random streams do not depend on which items were loaded.

    Only the CPU generator: augmentations run on the CPU, and `torch.manual_seed` would also queue a lazy CUDA
    seeding call (with a formatted stack trace) per item on a CUDA build without a GPU."""

    def __enter__(self) -> _SeededRandomness:
        self._torch = torch.default_generator.get_state()
        self._python = random.getstate()
        self._numpy = np.random.get_state()
        return self

    def seed(self, value: int) -> None:
        _seed_generators(value)

    def __exit__(self, *exc) -> None:
        torch.default_generator.set_state(self._torch)
        random.setstate(self._python)
        np.random.set_state(self._numpy)


class PairedDataset(Dataset):
    """Key ``(stream, index, batch_number, position)`` -> item ``index`` of the source or target dataset.

    With ``seed`` set, every item is loaded with the random generators seeded from `item_seed` (``seed``, stream,
    batch number, position), so its augmentation depends on nothing else. Without, items of a stream are fetched
    in one batched call and draw from the generators as they are. Keys ``(stream, index)`` load unseeded.
    """

    def __init__(self, source, target=None, seed: int | None = None):
        self.datasets = {SOURCE: source, TARGET: target}
        self.seed = seed

    def __getitem__(self, key: tuple):
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple]) -> list:
        if self.seed is not None and all(len(key) == 4 for key in keys):
            return self._seeded(keys)
        out = []
        for stream in (SOURCE, TARGET):
            idx = [key[1] for key in keys if key[0] == stream]
            if not idx:
                continue
            ds = self.datasets[stream]
            items = ds.__getitems__(idx) if hasattr(ds, "__getitems__") else [ds[i] for i in idx]
            out.extend((stream, item) for item in items)
        return out

    def _seeded(self, keys: list[tuple]) -> list:
        out = []
        with _SeededRandomness() as rng:
            for stream in (SOURCE, TARGET):
                mine = [key for key in keys if key[0] == stream]
                if not mine:
                    continue
                ds = self.datasets[stream]
                seeds = [item_seed(self.seed, stream, number, position) for _, _, number, position in mine]
                if _formatted_by_image_transformer(ds):
                    token = _BATCH_ITEM_SEEDS.set(seeds)
                    try:
                        items = ds.__getitems__([key[1] for key in mine])
                    finally:
                        _BATCH_ITEM_SEEDS.reset(token)
                else:
                    items = []
                    for key, seed in zip(mine, seeds):
                        rng.seed(seed)
                        items.append(ds[key[1]])
                out.extend((stream, item) for item in items)
        return out

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets.values() if d is not None)


def _endless_global_batches(n: int, global_batch: int, generator: torch.Generator, shuffle: bool) -> Iterator:
    while True:
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n - global_batch + 1, global_batch):
            yield order[start : start + global_batch]


class PairedInfiniteBatchSampler(Sampler):
    """Endless batches of ``(stream, index, batch_number, position)`` keys: ``source_batch_size`` source +
    ``target_batch_size`` target keys per batch.

    Each stream reshuffles with its own generator (seeded from ``seed``) whenever a pass is used up, dropping the
    incomplete tail. The permutation is global; process ``rank`` of ``num_replicas`` takes its slice of every
    global batch. ``batch_number`` counts from 0 and ``position`` is the key's place in the stream's *global*
    batch, which is what `PairedDataset` seeds each item's augmentation with. No ``__len__``: the stream ends only
    when the trainer stops (``max_steps``).
    """

    def __init__(
        self,
        source_size: int,
        source_batch_size: int,
        target_size: int = 0,
        target_batch_size: int = 0,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
    ):
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"invalid rank {rank} for num_replicas {num_replicas}.")
        for name, size, bs in ((SOURCE, source_size, source_batch_size), (TARGET, target_size, target_batch_size)):
            if bs < 0 or (name == SOURCE and bs == 0):
                raise ValueError(f"{name} batch size must be positive, got {bs}.")
            if bs and size < bs * num_replicas:
                raise ValueError(
                    f"the {name} dataset has {size} examples, fewer than one global batch "
                    f"({bs} per device x {num_replicas} processes); lower the batch size."
                )
        self.sizes = {SOURCE: source_size, TARGET: target_size}
        self.batch_sizes = {SOURCE: source_batch_size, TARGET: target_batch_size}
        self.seed, self.num_replicas, self.rank, self.shuffle = seed, num_replicas, rank, shuffle

    def __iter__(self) -> Iterator[list[tuple[str, int]]]:
        streams = {}
        for offset, stream in enumerate((SOURCE, TARGET)):
            bs = self.batch_sizes[stream]
            if bs:
                g = torch.Generator().manual_seed(self.seed + 1_000_003 * offset)
                batches = _endless_global_batches(self.sizes[stream], bs * self.num_replicas, g, self.shuffle)
                streams[stream] = (bs, batches)
        number = 0
        while True:
            keys = []
            for stream, (bs, batches) in streams.items():
                first = self.rank * bs
                local = next(batches)[first : first + bs]
                keys.extend((stream, i, number, first + j) for j, i in enumerate(local.tolist()))
            yield keys
            number += 1


def _paired_collate(items: list[tuple[str, dict]]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for stream in (SOURCE, TARGET):
        examples = [item for s, item in items if s == stream]
        if not examples:
            continue
        batch = collate_images(examples)
        if stream == SOURCE:
            if "labels" not in batch:
                raise ValueError("source examples have no labels: the source dataset must be labeled.")
            out["source_pixel_values"], out["source_labels"] = batch["pixel_values"], batch["labels"]
        else:
            out["target_pixel_values"] = batch["pixel_values"]
            if "pixel_values_strong" in batch:
                out["target_strong_pixel_values"] = batch["pixel_values_strong"]
    return out


def make_paired_dataloader(
    source,
    target=None,
    source_batch_size: int = 32,
    target_batch_size: int | None = None,
    seed: int = 0,
    num_replicas: int = 1,
    rank: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    seed_augmentation: bool = True,
    **dataloader_kwargs,
) -> DataLoader:
    """Endless DataLoader of paired batches.

    Each batch: ``source_pixel_values`` (B, 3, H, W), ``source_labels`` (B,), and with a target
    ``target_pixel_values`` (Bt, 3, H, W) (+ ``target_strong_pixel_values`` if the target yields strong views).
    Sizes are per process; ``target_batch_size`` defaults to ``source_batch_size`` (release: 32 + 32).
    ``seed`` fixes the sampling order and, with ``seed_augmentation`` (default), every item's augmentation
    (see `PairedDataset`): the batches do not depend on workers, processes or resuming.
    """
    if source is None or len(source) == 0:
        raise ValueError("the source dataset is empty.")
    if target is not None and len(target) == 0:
        raise ValueError("the target dataset is empty.")
    tbs = 0 if target is None else (source_batch_size if target_batch_size is None else target_batch_size)
    sampler = PairedInfiniteBatchSampler(
        len(source), source_batch_size, 0 if target is None else len(target), tbs, seed, num_replicas, rank
    )
    return DataLoader(
        PairedDataset(source, target, seed if seed_augmentation else None),
        batch_sampler=sampler,
        collate_fn=_paired_collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        **dataloader_kwargs,
    )
