"""Image sets read as ``datasets.Dataset`` in one schema: class-folder trees, flat folders of unlabeled images, image
lists and loaded datasets.

Schema: ``image`` (``Image(decode=False)``: nothing is decoded when a set is read, the transform decodes with
`open_rgb`, so an unreadable file is named) and, when labeled, a ``ClassLabel`` ``label``. Every error is a
:class:`DataError` whose message says how to fix the data; ``name`` arguments say how the caller calls the set (a
path, or a command-line flag) and ``other`` what the caller calls the opposite kind of set (labeled vs unlabeled), so
a labeled set given where an unlabeled one belongs (or the reverse) is refused with the right alternative.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import datasets
from datasets import ClassLabel, Dataset, Features, Image
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image as PILImage

__all__ = [
    "IMAGE_EXTENSIONS",
    "ClassMismatchError",
    "CorruptImageError",
    "DataError",
    "DataNotFoundError",
    "check_same_classes",
    "classes_of",
    "files_dataset",
    "filter_classes",
    "hold_out",
    "image_folder",
    "image_paths",
    "in_schema",
    "load_image_dataset",
    "labels_of",
    "open_rgb",
    "read_image_list",
    "read_list_text",
    "verify_images",
]

IMAGE_EXTENSIONS = tuple(ImageFolder.EXTENSIONS)  # what load_dataset("imagefolder") reads


class DataError(RuntimeError):
    """The data cannot be used as asked; the message says how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A folder, list file or dataset is missing."""


class ClassMismatchError(DataError):
    """Two sets (or a set and the expected class list) disagree on the classes."""


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded."""


def files_dataset(images: Sequence[Any], labels: Sequence[int] | None = None, classes=None) -> Dataset:
    """Images (paths as str, or arrays) + labels named by ``classes``, in the schema; no file is opened."""
    data, features = {"image": list(images)}, {"image": Image(decode=False)}
    if labels is not None:
        data["label"], features["label"] = [int(y) for y in labels], ClassLabel(names=list(classes))
    return Dataset.from_dict(data, features=Features(features))


def image_paths(ds: Dataset) -> list[str | None]:
    """The file path of every image (None for images embedded as bytes)."""
    return [v.get("path") if isinstance(v, dict) else None for v in ds.select_columns(["image"])["image"]]


def labels_of(ds: Dataset) -> list[int]:
    return list(ds.select_columns(["label"])["label"])


def classes_of(ds: Dataset) -> list[str]:
    return list(ds.features["label"].names)


def _images_under(folder: Path, recursive: bool = True) -> list[str]:
    """The image files under ``folder`` (sorted, hidden ones skipped, imagefolder's extensions); a plain walk, as
    ``load_dataset("imagefolder")`` spends milliseconds per file resolving and caching local files."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        images = [f for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        found += [os.path.join(dirpath, f) for f in images]
    return found


def image_folder(root: str | os.PathLike, labeled: bool = True, name: str = "", other: str = "") -> Dataset:
    """A folder of images. Labeled: ``root/<class>/**/<images>``, every class folder holding images. Unlabeled: the
    images directly in ``root``; sub-folders with images mean a labeled set (``other``: the caller's name for one)."""
    root, name = Path(root), name or ("image folder" if labeled else "unlabeled image folder")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if labeled and not classes:
        raise DataNotFoundError(
            f"{name} {root} has no class sub-folders, so it has no labels; expected {root}/<class name>/<image files>"
            + (f" (a flat folder of unlabeled images: pass it as {other})" if other else "")
        )
    per_class = {c: _images_under(root / c) for c in classes}
    if labeled and (empty := [c for c in classes if not per_class[c]]):
        raise DataError(
            f"{len(empty)} class folder(s) under {root} hold no images ({', '.join(empty[:20])}"
            f"{', ...' if len(empty) > 20 else ''}). Every domain needs every class: finish the download/extraction "
            "or remove stray folders"
        )
    if labeled:
        return files_dataset(
            [p for c in classes for p in per_class[c]],
            [i for i, c in enumerate(classes) for _ in per_class[c]],
            classes,
        )
    if nested := [c for c in classes if per_class[c]]:
        raise DataError(
            f"{name} {root} holds {len(nested)} sub-folders with images ({', '.join(f'{d}/' for d in nested[:5])}). "
            "That is the layout of a labeled image folder (one folder per class): "
            f"{f'pass it as {other} to use its labels' if other else 'read it with labeled=True'}. "
            f"{name} takes a flat folder of unlabeled images."
        )
    if not (images := _images_under(root, recursive=False)):
        raise DataNotFoundError(f"{name} {root} holds no images; point it at the folder with the image files")
    return files_dataset(images)


def read_list_text(list_file: str | os.PathLike) -> str:
    """An image list as text: UTF-8 (a BOM is fine), else a DataError naming the file, the line and the byte."""
    data = Path(list_file).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{list_file}:{line}: not UTF-8 text (byte {data[exc.start]:#04x}); image lists must be UTF-8. Convert "
            f"the file, e.g. `iconv -f latin1 -t utf-8 {list_file} > fixed.txt` if it was written as Latin-1, and "
            "check that its paths then match the file names on disk"
        ) from exc


def read_image_list(
    list_file: str | os.PathLike, root=None, classes=None, labeled: bool = True, name: str = "", other: str = ""
) -> Dataset:
    """A "relative/path label" list as a labeled dataset, or (``labeled=False``) a list of image paths. Paths are
    relative to ``root`` (default: the list's folder). Class names: ``classes``, else each label's parent folder
    name, which must be one per label. Blank lines and ``#`` comments are skipped."""
    list_file, name = Path(list_file), name or ("image list" if labeled else "unlabeled image list")
    root = Path(root) if root is not None else list_file.parent
    text = read_list_text(list_file)
    lines = [(n, s) for n, line in enumerate(text.splitlines(), 1) if (s := line.strip()) and not s.startswith("#")]
    rows = []
    for n, line in lines if labeled else ():
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            unlabeled = f" (a list of paths without labels: pass it as {other})" if other else ""
            raise DataError(
                f"{list_file}:{n}: expected 'relative/path label' (integer label), got {line!r}{unlabeled}"
            )
        if int(parts[1]) < 0:
            raise DataError(f"{list_file}:{n}: negative label {int(parts[1])}")
        rows.append((parts[0], int(parts[1])))
    if looks := [(n, line) for n, line in lines if not labeled and _labeled_line(root, line)]:
        raise DataError(
            f"{name} {list_file}: {len(looks)} of {len(lines)} lines look like 'path label' (line "
            f"{looks[0][0]}: {looks[0][1]!r}). That is a labeled image list: "
            f"{f'pass it as {other} to use its labels' if other else 'read it with labeled=True'}. "
            f"{name} takes one image path per line."
        )
    if not lines:
        raise DataError(f"{'' if labeled else name + ' '}{list_file} lists no images")
    paths = [str(root / rel) for rel, _ in rows] if labeled else [str(root / line) for _, line in lines]
    if missing := [p for p in paths if not Path(p).is_file()]:
        raise DataNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {list_file} do not exist under {root}, e.g. "
            f"{', '.join(missing[:5])}. Paths in a list are relative to {root}: check that it is the folder the list "
            "was written for"
        )
    if not labeled:
        return files_dataset(paths)
    n_labels = max(y for _, y in rows) + 1
    if classes is not None and n_labels > len(classes):
        raise ClassMismatchError(
            f"{list_file} uses label {n_labels - 1} but only {len(classes)} class names are known"
        )
    if classes is None:
        names: dict[int, set[str]] = {}
        for path, (_, y) in zip(paths, rows):
            names.setdefault(y, set()).add(Path(path).parent.name)
        ambiguous = [(y, sorted(v)[:5]) for y, v in names.items() if len(v) > 1]
        absent = sorted(set(range(n_labels)) - set(names))
        if ambiguous or absent:
            detail = f"labels {absent[:10]} never appear"
            if ambiguous:
                detail = f"label {ambiguous[0][0]} appears under folders {ambiguous[0][1]}"
            raise DataError(
                f"cannot name the classes of {list_file} from its paths ({detail}); give the class names in label "
                "order (classes=; in a recipe preset, add 'classes:' to the benchmark YAML)"
            )
        classes = [next(iter(names[y])) for y in range(n_labels)]
    return files_dataset(paths, [y for _, y in rows], classes)


def _labeled_line(root: Path, line: str) -> bool:
    """A "path label" line in a list of paths: the line is no file, but the path before the number is."""
    head, _, tail = line.rpartition(" ")
    return not (root / line).is_file() and bool(head) and tail.lstrip("-").isdigit() and (root / head).is_file()


def load_image_dataset(dataset_id: str, split: str, name: str, config: str | None = None, hint: str = "") -> Dataset:
    """``datasets.load_dataset`` (Hub id or local files) or ``load_from_disk`` (a ``save_to_disk`` folder) of one
    split, unchanged (`in_schema` brings it into the schema); errors name ``name`` and the fix, ``hint`` is added to
    the one for an unknown config or split."""
    if (Path(dataset_id) / "state.json").is_file() or (Path(dataset_id) / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(dataset_id)
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise DataError(f"{name} {dataset_id!r} has splits {list(ds)}, not {split!r}: pass one of them")
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(dataset_id, name=config, split=split)
    except ConnectionError as exc:
        raise DataNotFoundError(
            f"{name}: could not reach the Hub for dataset {dataset_id!r} ({exc}). If you are offline, download it "
            "once with network access (it is then cached) and set HF_HUB_OFFLINE=1, or use a local path"
        ) from exc
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataNotFoundError(
            f"{name}: no dataset {dataset_id!r} on the Hub or on disk (private or gated: log "
            f"in with `hf auth login`): {exc}"
        ) from exc
    except ValueError as exc:  # unknown config or split
        raise DataError(
            f"{name}: cannot load split {split!r} of {dataset_id!r}: {exc}{' ' * bool(hint)}{hint}"
        ) from exc


def in_schema(ds: Dataset, name: str, labeled: bool, classes: Sequence[str] | None = None, other: str = "") -> Dataset:
    """A loaded dataset (any column names) as ``image`` (+ ``label``): labeled needs a label column (named by its
    ``ClassLabel`` or by ``classes``), unlabeled refuses one."""
    image = next((k for k, f in ds.features.items() if isinstance(f, Image)), None)
    label = next((k for k, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    label = label or next((k for k in ("label", "labels") if k in ds.features), None)
    use = f"pass it as {other}" if other else "read it with labeled=" + str(not labeled)
    if image is None or (labeled and label is None):
        hint = f" Without labels it is an unlabeled set: {use}." if image else ""
        raise DataError(
            f"{name} needs an Image column{' and a label column' * labeled}; has {list(ds.features)}.{hint}"
        )
    if not labeled and label is not None:
        raise DataError(f"{name} has a label column {label!r}: a labeled dataset, {use} to use its labels.")
    if not labeled:
        return ds.select_columns([image]).rename_columns({image: "image"}).cast_column("image", Image(decode=False))
    if not (classes := getattr(ds.features[label], "names", None) or classes):
        raise DataError(
            f"{name}: label column {label!r} is no ClassLabel; give the class names in label order (classes=; in a "
            "recipe preset, add 'classes:' to the benchmark YAML)"
        )
    ds = ds.select_columns([image, label]).rename_columns({image: "image", label: "label"})
    return ds.cast(Features({"image": Image(decode=False), "label": ClassLabel(names=list(classes))}))


def check_same_classes(source, target, names: tuple[str, str] = ("source", "target")) -> None:
    """ClassMismatchError listing the difference unless both (datasets or class lists) have one class list, in one
    order (label indices must mean the same class)."""
    a, b = (classes_of(x) if isinstance(x, Dataset) else list(x) for x in (source, target))
    only = [(n, sorted(set(x) - set(y))) for n, x, y in ((names[0], a, b), (names[1], b, a))]
    parts = [f"only in {n}: {d[:20]}{' ...' if len(d) > 20 else ''}" for n, d in only if d]
    moved = ", ".join(f"#{i}: {x} vs {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y)
    if a != b:
        raise ClassMismatchError(
            f"{names[0]} and {names[1]} have different classes "
            f"({'; '.join(parts) or 'same names in a different label order, e.g. ' + moved}). Both domains must use "
            "the same class folders / label numbering"
        )


def filter_classes(ds: Dataset, keep: Sequence[int]) -> Dataset:
    """The rows whose label is in ``keep``; the ``ClassLabel`` (so the label indices) stays the full set."""
    return ds.select([i for i, y in enumerate(labels_of(ds)) if y in set(keep)])


def hold_out(ds: Dataset, fraction: float, seed: int, name: str = "fraction", minimum: int = 1):
    """(rest, held-out part) of a labeled set: a stratified, seeded ``fraction`` (e.g. the source images the source
    validators score and training never sees), with at least ``minimum`` images; ``name`` says what set it."""
    try:
        parts = ds.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as exc:  # too few images per class
        raise DataError(f"{name} {fraction}: {exc}; raise the fraction") from exc
    if len(parts["test"]) < minimum:
        raise DataError(
            f"{name} {fraction} holds out {len(parts['test'])} images, fewer than the {minimum} needed: raise the "
            "fraction"
        )
    return parts["train"], parts["test"]


def verify_images(ds: Dataset, mode: str = "header", name: str = "") -> int:
    """Open every image file up front (``header``: PIL open; ``full``: decode; ``none``: skip); one
    CorruptImageError lists every unreadable file. Returns the number of files checked."""

    def problem(path: str) -> str | None:
        try:
            with PILImage.open(path) as im:
                im.load() if mode == "full" else None
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            return f"{path}: {type(exc).__name__}: {exc}"

    paths = [p for p in image_paths(ds) if p is not None] if mode != "none" else []
    with ThreadPoolExecutor(max_workers=8) as pool:
        bad = [msg for msg in pool.map(problem, paths) if msg]
    if bad:
        listing = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CorruptImageError(
            f"{len(bad)} of {len(paths)} images{f' of {name}' if name else ''} cannot be read:\n  {listing}\n"
            "Re-download / re-extract them, or delete them (and their image-list lines)"
        )
    return len(paths)


def open_rgb(image: Any) -> PILImage.Image:
    """An ``Image(decode=False)`` value (``{"path", "bytes"}``) or a PIL image, as RGB; CorruptImageError names the
    file."""
    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    try:
        with io.BytesIO(image["bytes"]) if image.get("bytes") is not None else open(image["path"], "rb") as fh:
            return PILImage.open(fh).convert("RGB")  # decodes while the file is open
    except (OSError, ValueError, TypeError, PILImage.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot read image {image.get('path') or '(embedded bytes)'} ({type(exc).__name__}: {exc}). Replace or "
            "delete the file (and its image-list line), or list every unreadable file up front with verify_images "
            "(the recipes: --verify_images header)"
        ) from exc
