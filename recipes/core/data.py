"""The recipes' data: the data flags, benchmark domains, a target without labels, and one task's datasets.

One schema everywhere: a ``datasets.Dataset`` with ``image`` (``Image(decode=False)``: decoded by the transform, so an
unreadable file is named) and, when labeled, a ``ClassLabel`` ``label``. UDA needs no target labels: ``--target_*``
give the target, ``--eval_*`` a labeled copy for reporting only. Errors say how to fix them (docs/datasets.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Dataset

from cmkd.benchmarks import BenchmarkConfig, ConfigError, DomainSpec, load_benchmark_config
from cmkd.data import with_image_transform
from cmkd.image_sets import (
    ClassMismatchError,
    DataError,
    DataNotFoundError,
    check_same_classes,
    classes_of,
    files_dataset,
    filter_classes,
    hold_out,
    image_folder,
    in_schema,
    load_image_dataset,
    read_image_list,
    verify_images,
)
from cmkd.transforms import build_transform, image_size_from_processor, normalization_from_processor

from .data_arguments import EVAL_FLAGS, TARGET_FLAGS, DataArguments, domain_root, find_list_file, where_to_get

DOMAIN_COLUMN_HINT = "If one config holds all domains, pass --domain_column naming them."


def _load_digits(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data: DataArguments) -> Dataset:
    from torchvision import datasets as tvd

    root, train, download = str(data.data_dir), split == "train", data.download
    build, files = {
        "mnist": (lambda: tvd.MNIST(root, train=train, download=download), "MNIST/raw/*-ubyte"),
        "usps": (lambda: tvd.USPS(root, train=train, download=download), "usps.bz2 / usps.t.bz2"),
        "svhn": (lambda: tvd.SVHN(root, split=split, download=download), f"{split}_32x32.mat"),
    }[spec.name.lower()]
    try:
        base = build()
    except (RuntimeError, OSError, ValueError) as exc:
        hint = "pass --download to let torchvision fetch it into --data_dir, or copy the files there"
        raise DataNotFoundError(
            f"{spec.name.upper()} ({split}) not found or unreadable under {root} (expected {files}): "
            f"{str(exc).rstrip('.')}. {'the download failed (no network?)' if download else hint}. "
            f"{where_to_get(cfg)}"
        ) from exc
    images = np.asarray(base.data)
    images = images.transpose(0, 2, 3, 1) if images.ndim == 4 else images  # SVHN: N, C, H, W
    labels = base.labels if getattr(base, "targets", None) is None else base.targets
    return files_dataset(list(images), labels, cfg.classes or [str(i) for i in range(cfg.num_classes)])


def load_domain(
    bench: BenchmarkConfig | str, domain: str, data: DataArguments | None = None, *, split: str = "train", **flags: Any
) -> Dataset:
    """One labeled domain from ``data`` (or ``DataArguments(**flags)``): --dataset_id (one config per domain, or
    --domain_column), else an image list, else the ImageFolder ``<data_dir>/<domain folder>``; digits: torchvision.
    ``split``: "train" or "test" (benchmarks without an official split use the whole domain for both)."""
    cfg = load_benchmark_config(bench) if isinstance(bench, str) else bench
    data = data or DataArguments(**flags)
    try:
        spec = cfg.domain(domain)
    except ConfigError as exc:
        raise DataError(str(exc)) from exc
    data_dir = Path(data.data_dir) if data.data_dir else None
    if data_dir is not None and not data.dataset_id and not data.download and not data_dir.is_dir():
        raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {where_to_get(cfg)}")
    if data.dataset_id:
        config = (data.dataset_config or ("" if data.domain_column else "{domain}")).format(
            domain=spec.folder, key=spec.key, name=spec.name
        )
        hint = DOMAIN_COLUMN_HINT * bool(config)
        ds = load_image_dataset(data.dataset_id, split, "--dataset_id", config or None, hint)
        where = f"Hub dataset {data.dataset_id!r}"
        if (column := data.domain_column) and column not in ds.features:
            raise DataError(f"--domain_column {column!r} not in {where}; columns: {list(ds.features)}")
        if column:
            values = [str(getattr(ds.features[column], "int2str", str)(v)) for v in ds[column]]
            if not (keep := [i for i, v in enumerate(values) if spec.matches(v)]):
                raise DataError(
                    f"no rows of {where} have {column} = {spec.key}/{spec.name}; values: {sorted(set(values))[:20]}"
                )
            ds = ds.select(keep)
        ds = in_schema(ds, f"--dataset_id {where}", True, cfg.classes, "--target_dataset_id")
    elif data_dir is None and cfg.loader == "torchvision":
        raise DataNotFoundError(f"digits need --data_dir (torchvision files live there). {where_to_get(cfg)}")
    elif cfg.loader == "torchvision":
        ds, where = _load_digits(cfg, spec, split, data), f"{spec.name} under {data_dir}"
    elif (list_file := find_list_file(cfg, spec, split, data)) is not None:
        ds, where = read_image_list(list_file, data_dir, cfg.classes), f"image list {list_file}"
    elif data_dir is None:
        raise DataNotFoundError(f"no data source for domain {spec.key}: pass --data_dir. {where_to_get(cfg)}")
    else:
        ds, where = image_folder(domain_root(cfg, spec, data_dir)), str(domain_root(cfg, spec, data_dir))
    if len(classes_of(ds)) != cfg.num_classes:
        raise ClassMismatchError(
            f"{where} has {len(classes_of(ds))} classes but {cfg.display_name} has {cfg.num_classes}: is this the "
            f"right folder, and is the download complete? {where_to_get(cfg)}"
        )
    verify_images(ds, data.verify_images, f"domain {spec.key}")
    return ds


def load_target(data: DataArguments, classes: Sequence[str] | None = None) -> Dataset:
    """The target of --target_* (no labels; ``classes`` None) or --eval_* (labeled, reporting only: its classes must
    be ``classes``, the source's, in the same order)."""
    labeled = classes is not None
    kind, other = ("eval", "target") if labeled else ("target", "eval")
    folder, listed, dataset_id = (getattr(data, f"{kind}_{s}") for s in ("dir", "list", "dataset_id"))
    if (folder and not Path(folder).is_dir()) or (listed and not Path(listed).is_file()):
        raise DataNotFoundError(f"--{kind}_{'dir' if folder else 'list'} {folder or listed} does not exist")
    if folder:
        ds = image_folder(folder, labeled, f"--{kind}_dir", f"--{other}_dir")
    elif listed:
        ds = read_image_list(listed, None, classes, labeled, f"--{kind}_list", f"--{other}_list")
    else:
        ds = load_image_dataset(dataset_id, getattr(data, f"{kind}_split"), f"--{kind}_dataset_id")
        ds = in_schema(ds, f"--{kind}_dataset_id {dataset_id!r}", labeled, classes, f"--{other}_dataset_id")
    if labeled:
        check_same_classes(list(classes), ds, ("the source", "the labeled target"))
    return ds


def split_source(source: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): ``--source_val_fraction`` of the source, for the source validators (at least
    4 images)."""
    return hold_out(source, fraction, seed, "--source_val_fraction", minimum=4) if fraction > 0 else (source, None)


def partial_target_classes(classes: Sequence[str], num_classes: int) -> list[int]:
    """Label indices of the first ``num_classes`` class names in alphabetical order (partial-set protocol)."""
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"cannot keep {num_classes} of {len(classes)} classes")
    return [i for i, c in enumerate(classes) if c in sorted(classes)[:num_classes]]


def partial_target(ds: Dataset, bench: BenchmarkConfig) -> Dataset:
    """The benchmark's partial-set target (Office-Home: the first 25 classes alphabetically)."""
    if not bench.partial.available:
        raise ConfigError(f"{bench.display_name} has no partial-set protocol")
    return filter_classes(ds, partial_target_classes(classes_of(ds), bench.partial.num_target_classes))


def bench_transform(bench: BenchmarkConfig, preset: str, *, image_size: int | None = None, processor=None):
    """``cmkd.transforms.build_transform(preset)`` at the model's input size and normalisation (its image processor;
    without one, the benchmark's size and CLIP's normalisation)."""
    mean, std = normalization_from_processor(processor)
    size = (
        image_size if image_size is not None else image_size_from_processor(processor, bench.augmentation.image_size)
    )
    return build_transform(preset, size, mean, std)


def default_num_workers(max_workers: int = 8) -> int:
    """One DataLoader worker per available CPU, at most ``max_workers`` (decoding + augmenting is CPU-bound)."""
    return min(max_workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@dataclass
class TaskData:
    """One transfer task's datasets as the trainer takes them (dict items)."""

    source: Dataset  # labeled source, training augmentation
    target: Dataset  # target for adaptation, training augmentation (+ strong view with FixMatch); no labels
    eval: Dataset  # target for evaluation, test transform; labeled only when labels were given (reporting)
    classes: list[str]
    source_val: Dataset | None = None  # --source_val_fraction: held-out labeled source, test transform


def load_task_data(
    bench: BenchmarkConfig,
    data: DataArguments,
    source: str,
    target: str,
    *,
    partial: bool,
    fixmatch: bool,
    seed: int,
    image_size: int | None = None,
    processor: Any = None,
) -> TaskData:
    """Source (minus --source_val_fraction), target without labels and the target's evaluation view, with the
    benchmark's presets at the model's input size; partial-set runs keep the benchmark's target classes."""
    src, src_val = split_source(load_domain(bench, source, data), data.source_val_fraction, seed)
    if target in bench.domains:
        tgt = load_domain(bench, target, data)
        tgt_eval = tgt if bench.eval_split == "train" else load_domain(bench, target, data, split=bench.eval_split)
        for ds in (tgt, tgt_eval):
            check_same_classes(src, ds, (f"source {source}", f"target {target}"))
        tgt, tgt_eval = (partial_target(tgt, bench), partial_target(tgt_eval, bench)) if partial else (tgt, tgt_eval)
    else:  # --target_* (no labels) and/or --eval_* (labeled, reporting only; alone, also the target)
        tgt_eval = load_target(data, classes_of(src)) if data.given(EVAL_FLAGS) else None
        tgt = load_target(data) if data.given(TARGET_FLAGS) or tgt_eval is None else tgt_eval
        tgt_eval = tgt if tgt_eval is None else tgt_eval
    aug, size = bench.augmentation, {"image_size": image_size, "processor": processor}

    def view(ds: Dataset, *presets: str | None) -> Dataset:  # cmkd's lazy transform view, presets at the model's size
        return with_image_transform(ds, *(bench_transform(bench, p, **size) if p else None for p in presets))

    return TaskData(
        source=view(src, aug.train_preset(source, "source")),
        target=view(  # adaptation never sees target labels
            tgt.select_columns(["image"]), aug.train_preset(target, "target"), aug.strong if fixmatch else None
        ),
        eval=view(tgt_eval, aug.test),
        classes=classes_of(src),
        source_val=view(src_val, aug.test) if src_val is not None else None,
    )
