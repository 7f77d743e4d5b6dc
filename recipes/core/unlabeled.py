"""A target domain without labels: flags, loaders and the checks that say which flag fits the data found.

Unsupervised domain adaptation needs no target labels, so the recipes take the target as

- ``--target_dir``: a flat folder of images (no class sub-folders);
- ``--target_list``: a text file with one image path per line (relative to the list's folder);
- ``--target_dataset_id``: a ``datasets`` dataset (Hub id, local path for ``load_dataset`` or a ``save_to_disk``
  folder) with an image column and no label column.

A labeled copy of the target is optional and only reports accuracy (and allows the oracle selection):
``--eval_dir`` (``<dir>/<class>/<images>``), ``--eval_list`` (``path label`` lines) or ``--eval_dataset_id``.
Given alone, an ``--eval_*`` set is also the unlabeled training target (its labels dropped), as in the paper where
the whole target set is both. ``--source_val_fraction`` holds a stratified, seeded part of the source out of
training for the ``source_accuracy`` and ``dev`` validators. ``--selection`` picks the checkpoint rule.

The loaders return ``datasets.Dataset`` objects in the schema of :mod:`recipes.core.data` (``image``, plus a
``ClassLabel`` ``label`` when labeled), so targets and benchmark domains share one code path to cmkd's transforms.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from datasets import Dataset

from cmkd.validators import ORACLE_NAME, VALIDATORS

from .config import ConfigError
from .data import (
    IMG_EXTENSIONS,
    DataError,
    DataNotFoundError,
    _is_image,
    as_image_dataset,
    check_same_classes,
    files_dataset,
    image_and_label_columns,
    labels_of,
    load_hf_dataset,
    read_image_list,
    read_list_text,
    scan_image_folder,
)

__all__ = [
    "EVAL_FLAGS",
    "LABEL_FREE_DESTS",
    "TARGET_FLAGS",
    "add_label_free_arguments",
    "check_label_free_args",
    "custom_target_name",
    "load_labeled_eval",
    "load_unlabeled_target",
    "split_source",
]

TARGET_FLAGS = ("target_dir", "target_list", "target_dataset_id")
EVAL_FLAGS = ("eval_dir", "eval_list", "eval_dataset_id")
SELECTION_FLAGS = ("selection", "source_val_fraction")
SPLIT_FLAGS = ("target_split", "eval_split")
LABEL_FREE_DESTS = (*TARGET_FLAGS, *EVAL_FLAGS, *SPLIT_FLAGS, *SELECTION_FLAGS)  # RunConfig fields
ORACLE = "oracle"
LABELS_HINT = "--eval_dir (class sub-folders), --eval_list ('path label' lines) or --eval_dataset_id"


def _flag(name: str) -> str:
    return f"--{name}"


# --------------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------------


def add_label_free_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The target-without-labels, reporting and selection flags (see the module docstring)."""
    target = parser.add_argument_group("target without labels (unsupervised: no target labels are needed)")
    target.add_argument("--target_dir", help="flat folder of unlabeled target images (replaces --target's domain)")
    target.add_argument("--target_list", help="text file, one target image path per line (relative to the file)")
    target.add_argument("--target_dataset_id", help="datasets id or path of unlabeled target images (no labels)")
    target.add_argument("--target_split", default="train", help="split of --target_dataset_id (default: train)")
    report = parser.add_argument_group("labeled target for reporting only (optional)")
    report.add_argument("--eval_dir", help="labeled target folder <dir>/<class>/<images>: accuracy is reported")
    report.add_argument("--eval_list", help="labeled target image list ('relative/path label' lines)")
    report.add_argument("--eval_dataset_id", help="datasets id or path of a labeled target (image + label columns)")
    report.add_argument("--eval_split", default="train", help="split of --eval_dataset_id (default: train)")
    select = parser.add_argument_group("checkpoint selection")
    select.add_argument(
        "--selection",
        choices=[*VALIDATORS, "last", ORACLE],
        help=f"rule choosing the reported checkpoint: a label-free validator (default: CMKDTrainingArguments' "
        f"metric_for_best_model), 'last' (the last checkpoint, label-free) or '{ORACLE}' = {ORACLE_NAME}",
    )
    select.add_argument(
        "--source_val_fraction",
        type=float,
        default=0.0,
        help="fraction of the source held out of training (stratified, seeded) for the source_accuracy and dev "
        "validators (e.g. 0.1; default 0: train on the whole source)",
    )
    return parser


def custom_target_name(args: argparse.Namespace) -> str | None:
    """Task name of a target given by --target_* / --eval_* (None: the target is a benchmark domain)."""
    given = [getattr(args, f, None) for f in (*TARGET_FLAGS, *EVAL_FLAGS)]
    path = next((g for g in given if g), None)
    if path is None:
        return None
    if getattr(args, "target", None):
        return str(args.target)
    stem = Path(str(path).rstrip("/")).stem if not str(path).endswith("/") else Path(str(path)).name
    return stem or "target"


def check_label_free_args(args: argparse.Namespace, benchmark) -> None:
    """Refuse impossible combinations before anything is loaded; each message names the flag that fits."""
    targets = [f for f in TARGET_FLAGS if getattr(args, f, None)]
    evals = [f for f in EVAL_FLAGS if getattr(args, f, None)]
    name = getattr(args, "target", None)
    if name and (targets or evals) and any(d.matches(name) for d in benchmark.domains.values()):
        raise ConfigError(
            f"--target {name} is a domain of {benchmark.display_name}, but {_flag((targets or evals)[0])} gives the "
            "target images: drop --target (or use it as a new name, e.g. --target photos), or drop "
            f"{_flag((targets or evals)[0])} to use the benchmark's domain"
        )
    if len(targets) > 1:
        raise ConfigError(f"give the unlabeled target once: {', '.join(map(_flag, targets))} are alternatives")
    if len(evals) > 1:
        raise ConfigError(f"give the labeled target once: {', '.join(map(_flag, evals))} are alternatives")
    if (targets or evals) and getattr(args, "all", False):
        raise ConfigError(
            f"{_flag((targets or evals)[0])} gives one target; run one task with --source instead of --all"
        )
    fraction = getattr(args, "source_val_fraction", 0.0) or 0.0
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--source_val_fraction must be in [0, 1), got {fraction}")
    selection = getattr(args, "selection", None)
    if selection in ("source_accuracy", "dev") and fraction == 0.0:
        raise ConfigError(
            f"--selection {selection} scores a held-out source split: add --source_val_fraction (e.g. 0.1)"
        )
    if selection == ORACLE and targets and not evals:
        raise ConfigError(
            f"--selection {ORACLE} is the {ORACLE_NAME}, and {_flag(targets[0])} has no labels: add a labeled copy "
            f"of the target with {LABELS_HINT}, or choose a label-free --selection ({', '.join(VALIDATORS)})"
        )
    if selection == ORACLE and getattr(args, "zero_shot", False):
        raise ConfigError(f"--zero-shot trains nothing, so --selection {ORACLE} has no checkpoints to choose from")


# --------------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------------


def _flat_folder(root: Path) -> list[str]:
    if not root.is_dir():
        raise DataNotFoundError(f"--target_dir {root} is not a folder")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    images = [e.path for e in entries if e.is_file() and _is_image(e.name)]
    subdirs = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    with_images = [d for d in subdirs if any(_is_image(f) for _, _, fs in os.walk(root / d) for f in fs)]
    if with_images:
        listed = ", ".join(f"{d}/" for d in with_images[:5]) + (", ..." if len(with_images) > 5 else "")
        found = f"{len(images)} images and " if images else ""
        raise DataError(
            f"--target_dir {root} holds {found}{len(with_images)} sub-folders with images ({listed}). That is the "
            "layout of a labeled ImageFolder (one folder per class): pass it as --eval_dir to adapt on its images "
            "and report accuracy with its labels. --target_dir takes a flat folder of unlabeled images."
        )
    if not images:
        raise DataNotFoundError(
            f"--target_dir {root} holds no images (extensions: {', '.join(IMG_EXTENSIONS)}); point it at the folder "
            "that contains the image files"
        )
    return images


def _path_list(list_file: Path) -> list[str]:
    if not list_file.is_file():
        raise DataNotFoundError(f"--target_list {list_file} does not exist")
    root = list_file.parent
    paths, missing, labeled = [], [], []
    for lineno, line in enumerate(read_list_text(list_file).splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line) if os.path.isabs(line) else root / line
        if not path.is_file():
            head, _, tail = line.rpartition(" ")
            candidate = Path(head) if os.path.isabs(head) else root / head
            if head and tail.lstrip("-").isdigit() and candidate.is_file():
                labeled.append((lineno, line))
            else:
                missing.append(str(path))
        paths.append(str(path))
    if labeled:
        lineno, line = labeled[0]
        raise DataError(
            f"--target_list {list_file}: {len(labeled)} of {len(paths)} lines look like 'path label' (line {lineno}: "
            f"{line!r}). That is a labeled image list: pass it as --eval_list to adapt on its images and report "
            "accuracy with its labels. --target_list takes one image path per line."
        )
    if not paths:
        raise DataError(f"--target_list {list_file} lists no images")
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {list_file} do not exist, e.g. "
            f"{', '.join(missing[:5])}; paths are relative to the list's folder"
        )
    return paths


def load_unlabeled_target(args: argparse.Namespace | dict[str, Any]) -> Dataset:
    """The unlabeled target given by --target_dir / --target_list / --target_dataset_id (an ``image`` column)."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    if get("target_dir"):
        return files_dataset(_flat_folder(Path(get("target_dir"))))
    if get("target_list"):
        return files_dataset(_path_list(Path(get("target_list"))))
    dataset_id = get("target_dataset_id")
    ds = load_hf_dataset(dataset_id, get("target_split") or "train", "--target_dataset_id")
    image, label = image_and_label_columns(ds)
    if image is None:
        raise DataError(f"--target_dataset_id {dataset_id!r} has no Image column; columns: {list(ds.features)}")
    if label is not None:
        raise DataError(
            f"--target_dataset_id {dataset_id!r} has a label column {label!r}: a labeled dataset. Pass it as "
            "--eval_dataset_id to adapt on its images and report accuracy with its labels; --target_dataset_id "
            "takes images without labels."
        )
    return as_image_dataset(ds, image, None)


def load_labeled_eval(args: argparse.Namespace | dict[str, Any], classes: Sequence[str]) -> Dataset:
    """The labeled target (reporting only) given by --eval_dir / --eval_list / --eval_dataset_id; its classes must
    be the source's, in the same order."""
    get = args.get if isinstance(args, dict) else lambda k: getattr(args, k, None)
    if get("eval_dir"):
        root = Path(get("eval_dir"))
        if not root.is_dir():
            raise DataNotFoundError(f"--eval_dir {root} is not a folder")
        if not any(e.is_dir() for e in os.scandir(root)) and any(_is_image(e.name) for e in os.scandir(root)):
            raise DataError(
                f"--eval_dir {root} holds images but no class sub-folders, so it has no labels: pass it as "
                "--target_dir (unlabeled target). --eval_dir takes <dir>/<class name>/<images>."
            )
        found, samples = scan_image_folder(root)
        ds = files_dataset(*zip(*samples), found)
    elif get("eval_list"):
        list_file = Path(get("eval_list"))
        if not list_file.is_file():
            raise DataNotFoundError(f"--eval_list {list_file} does not exist")
        try:
            found, samples = read_image_list(list_file, list_file.parent, classes)
        except DataError as exc:
            raise DataError(f"{exc}. An image list without labels is an unlabeled target: --target_list") from exc
        ds = files_dataset(*zip(*samples), found)
    else:
        dataset_id = get("eval_dataset_id")
        hf = load_hf_dataset(dataset_id, get("eval_split") or "train", "--eval_dataset_id")
        image, label = image_and_label_columns(hf)
        if image is None or label is None:
            hint = " Without labels it is an unlabeled target: --target_dataset_id." if image and not label else ""
            raise DataError(
                f"--eval_dataset_id {dataset_id!r} needs an Image column and a label column; columns "
                f"{list(hf.features)}.{hint}"
            )
        names = getattr(hf.features[label], "names", None) or list(classes)
        ds = as_image_dataset(hf, image, label, names)
    check_same_classes(list(classes), ds, ("the source", "the labeled target"))
    return ds


def drop_labels(ds: Dataset) -> Dataset:
    """The unlabeled view of a labeled domain (training never sees target labels)."""
    return ds.remove_columns("label")


def split_source(source: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): ``fraction`` of every class (at least one image of each class that has two or
    more), chosen by ``seed``; the held-out part never enters training."""
    if fraction <= 0:
        return source, None
    import numpy as np

    rng = np.random.default_rng(seed)
    targets = np.asarray(labels_of(source))
    held = []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        if len(idx) < 2:
            continue
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        held += rng.choice(idx, size=k, replace=False).tolist()
    held_set = set(held)
    if len(held) < 4:
        raise DataError(
            f"--source_val_fraction {fraction} holds out {len(held)} source images; the source validators need at "
            "least 4: raise the fraction"
        )
    train = [i for i in range(len(source)) if i not in held_set]
    return source.select(train), source.select(sorted(held))
