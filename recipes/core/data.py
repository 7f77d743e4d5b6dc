"""Domain datasets for the benchmarks: ImageFolder trees, image lists, Hub datasets and torchvision digits.

:func:`load_domain` returns a ``datasets.Dataset`` (``image`` column, ``label`` as a ``ClassLabel`` naming the
classes), turned into pixel values by cmkd's transforms through :func:`transformed`. Every
failure a user can cause (missing folder, unknown domain, classes differing between domains, unreadable images,
offline Hub) raises a :class:`DataError` whose message says what is wrong, where to get the data and how to lay it
out (docs/datasets.md has the long form).
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from datasets import ClassLabel, Features
from datasets import Dataset as HFDataset
from datasets import Image as HFImage
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from cmkd.data import with_image_transform

from .checks import sentence
from .config import BenchmarkConfig, ConfigError, DomainSpec, load_benchmark_config

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
LIST_SEARCH_SUBDIRS = ("", "image_list", "list")  # where shipped image lists live relative to --data_dir
DOCS = "docs/datasets.md"


class DataError(RuntimeError):
    """The data on disk / on the Hub cannot be used as asked; the message says how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A folder, list file or dataset is missing."""


class ClassMismatchError(DataError):
    """Source and target (or the data and the benchmark) disagree on the classes."""


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded."""


# --------------------------------------------------------------------------------------------------------------------
# Datasets: {"image": Image(decode=False), "label": ClassLabel}; decoded (RGB) by the transform, see `transformed`
# --------------------------------------------------------------------------------------------------------------------


def image_features(classes: Sequence[str] | None) -> Features:
    """The recipes' one schema: lazily decoded images (+ a ``ClassLabel`` with the class names when labeled)."""
    features = {"image": HFImage(decode=False)}
    if classes is not None:
        features["label"] = ClassLabel(names=list(classes))
    return Features(features)


def files_dataset(paths: Sequence[str], labels: Sequence[int] | None = None, classes=None) -> HFDataset:
    """Image files (+ labels) as a ``datasets.Dataset``; no file is opened here."""
    data: dict[str, list] = {"image": [str(p) for p in paths]}
    if labels is not None:
        data["label"] = [int(y) for y in labels]
    return HFDataset.from_dict(data, features=image_features(classes if labels is not None else None))


def open_rgb(image: Any) -> Image.Image:
    """An ``Image(decode=False)`` value (``{"path", "bytes"}``) or a PIL image, as RGB; unreadable -> CorruptImageError
    naming the file."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = image.get("path") if isinstance(image, dict) else None
    try:
        data = image.get("bytes") if isinstance(image, dict) else None
        with io.BytesIO(data) if data is not None else open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")  # forces the full decode while the file is open
    except (OSError, ValueError, TypeError, Image.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot read image {path or '(embedded bytes)'} ({type(exc).__name__}: {exc}). Replace or delete the "
            "file (and its image-list line), or run with --verify_images header to list every unreadable file up front"
        ) from exc


class DecodeThen:
    """Decode to RGB, then ``transform``: the image step in front of every cmkd transform (picklable for workers)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        return self.transform(open_rgb(image))


def transformed(dataset: HFDataset, transform: Callable, strong_transform: Callable | None = None) -> HFDataset:
    """``cmkd.data.with_image_transform`` over a recipes dataset: items ``{"pixel_values", "labels"?,
    "pixel_values_strong"?}``."""
    strong = DecodeThen(strong_transform) if strong_transform is not None else None
    return with_image_transform(dataset, DecodeThen(transform), strong)


def image_paths(dataset: HFDataset) -> list[str]:
    """The file of every row (None for images stored as bytes)."""
    return [v.get("path") if isinstance(v, dict) else None for v in dataset.select_columns(["image"])["image"]]


def labels_of(dataset: HFDataset) -> list[int]:
    return list(dataset.select_columns(["label"])["label"])


def classes_of(dataset: HFDataset) -> list[str]:
    return list(dataset.features["label"].names)


# --------------------------------------------------------------------------------------------------------------------
# Layout help for messages
# --------------------------------------------------------------------------------------------------------------------


def _anchor(cfg: BenchmarkConfig) -> str:
    return f"{DOCS}#{cfg.display_name.lower().replace(' ', '-').replace('.', '')}"


def expected_layout(cfg: BenchmarkConfig) -> str:
    """The folder tree a benchmark expects under --data_dir, as text for error messages."""
    lines = ["<data_dir>/"]
    if cfg.loader == "torchvision":
        lines += [
            "  MNIST/raw/train-images-idx3-ubyte, train-labels-idx1-ubyte,",
            "            t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte",
            "  usps.bz2, usps.t.bz2",
            "  train_32x32.mat, test_32x32.mat   (SVHN)",
        ]
        return "\n".join(lines)
    for spec in cfg.domains.values():
        if cfg.requires_image_lists:
            lines.append(f"  {spec.folder}/<image files>")
        else:
            lines.append(f"  {spec.folder}/<class name>/<image files>")
    list_names = sorted({name for spec in cfg.domains.values() for name in spec.list_files.values()})
    if list_names:
        req = "required" if cfg.requires_image_lists else "optional, with --image_list_dir"
        lines.append(f"  {list_names[0]}, ... ({req}; in <data_dir>, <data_dir>/image_list or <data_dir>/list;")
        lines.append('   one "relative/path label" per line, paths relative to <data_dir>)')
    return "\n".join(lines)


def _where_to_get(cfg: BenchmarkConfig) -> str:
    return (
        f"Get {cfg.display_name} from {cfg.homepage or 'its official page'} (licence: {cfg.license or 'see the page'})"
        f" and lay it out as:\n{expected_layout(cfg)}\nDetails: {_anchor(cfg)}"
    )


# --------------------------------------------------------------------------------------------------------------------
# Scanning
# --------------------------------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS) and not name.startswith(".")


def scan_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    """``root/<class>/**/<image>`` -> (sorted class names, [(path, label)]). Empty class folders are an error."""
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames.sort()
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        if not found:
            empty.append(name)
        samples += [(p, label) for p in found]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) under {root} hold no images ({', '.join(empty[:20])}"
            f"{', ...' if len(empty) > 20 else ''}; image extensions: {', '.join(IMG_EXTENSIONS)}). Every domain "
            "needs every class: finish the download/extraction or remove stray folders"
        )
    return classes, samples


def read_list_text(list_file: str | os.PathLike) -> str:
    """An image-list file as text. Lists are UTF-8 (a BOM is fine); any other encoding is a :class:`DataError`
    naming the file, the line and the byte, rather than a bare ``UnicodeDecodeError``."""
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
    list_file: str | os.PathLike,
    root: str | os.PathLike | None = None,
    classes: Sequence[str] | None = None,
) -> tuple[list[str], list[tuple[str, int]]]:
    """Parse a "relative/path label" file. Paths are relative to ``root`` (default: the list's folder).

    Class names come from ``classes`` (label order) when given, else from each label's parent folder name, which
    must be the same for every line with that label.
    """
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    samples, missing = [], []
    with io.StringIO(read_list_text(list_file)) as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise DataError(f"{list_file}:{lineno}: expected 'relative/path label' (integer label), got {line!r}")
            rel, label = parts[0], int(parts[1])
            if label < 0:
                raise DataError(f"{list_file}:{lineno}: negative label {label}")
            path = Path(rel) if os.path.isabs(rel) else root / rel
            if not path.is_file():
                missing.append(str(path))
            samples.append((str(path), label))
    if not samples:
        raise DataError(f"{list_file} lists no images")
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {len(samples)} images listed in {list_file} do not exist under {root}, e.g. "
            f"{', '.join(missing[:5])}. Paths in a list are relative to --data_dir; check that --data_dir points "
            "at the folder the list was written for"
        )
    n_labels = max(label for _, label in samples) + 1
    if classes is not None:
        if n_labels > len(classes):
            raise ClassMismatchError(
                f"{list_file} uses label {n_labels - 1} but only {len(classes)} class names are known"
            )
        return list(classes), samples
    names: dict[int, set[str]] = {}
    for path, label in samples:
        names.setdefault(label, set()).add(Path(path).parent.name)
    ambiguous = {k: v for k, v in names.items() if len(v) > 1}
    absent = sorted(set(range(n_labels)) - set(names))
    if ambiguous or absent:
        detail = (
            f"label {next(iter(ambiguous))} appears under folders {sorted(next(iter(ambiguous.values())))[:5]}"
            if ambiguous
            else f"labels {absent[:10]} never appear"
        )
        raise DataError(
            f"cannot name the classes of {list_file} from its paths ({detail}); add 'classes:' (names in label "
            "order) to the benchmark YAML"
        )
    return [next(iter(names[i])) for i in range(n_labels)], samples


def verify_images(
    dataset: HFDataset, mode: str = "header", domain: str = "", max_workers: int = 8, max_report: int = 20
) -> int:
    """Open every image file of ``dataset`` up front; raise one :class:`CorruptImageError` listing all bad files.

    ``header`` reads only the header (fast: catches non-images and truncated headers); ``full`` decodes every image.
    Returns the number of files checked (0 for images stored as bytes).
    """
    if mode == "none":
        return 0
    if mode not in ("header", "full"):
        raise ValueError(f"verify mode must be 'none', 'header' or 'full', got {mode!r}")

    def check(path: str) -> str | None:
        try:
            with Image.open(path) as im:
                if mode == "full":
                    im.load()
                elif im.size[0] <= 0 or im.size[1] <= 0:
                    return f"{path}: empty image"
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            return f"{path}: {type(exc).__name__}: {exc}"
        return None

    paths = [p for p in image_paths(dataset) if p is not None]
    with ThreadPoolExecutor(max_workers=max_workers) as pool:
        bad = [msg for msg in pool.map(check, paths) if msg]
    if bad:
        listing = "\n  ".join(bad[:max_report])
        more = f"\n  ... and {len(bad) - max_report} more" if len(bad) > max_report else ""
        raise CorruptImageError(
            f"{len(bad)} of {len(paths)} images of domain {domain!r} cannot be read:\n  {listing}{more}\n"
            "Re-download / re-extract them, or delete them (and their image-list lines)"
        )
    return len(paths)


# --------------------------------------------------------------------------------------------------------------------
# load_domain
# --------------------------------------------------------------------------------------------------------------------


def _domain_spec(cfg: BenchmarkConfig, domain: str | DomainSpec) -> DomainSpec:
    if isinstance(domain, DomainSpec):
        return domain
    try:
        return cfg.domain(domain)
    except ConfigError as exc:
        raise DataError(str(exc)) from exc


def _domain_root(cfg: BenchmarkConfig, spec: DomainSpec, data_dir: Path) -> Path:
    if not data_dir.is_dir():
        raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(cfg)}")
    tried = [data_dir / f for f in (spec.folder, *spec.alt_folders)]
    for path in tried:
        if path.is_dir():
            return path
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({spec.name}) not found: looked for "
        f"{' and '.join(str(p) for p in tried)}. {_where_to_get(cfg)}"
    )


def _find_list_file(cfg, spec, split, data_dir, image_list, image_list_dir) -> Path | None:
    if image_list is not None:
        path = Path(image_list)
        if not path.is_file():
            raise DataNotFoundError(f"image list {path} (domain {spec.key}) does not exist")
        return path
    name = spec.list_files.get(split)
    if image_list_dir is not None:
        if not name:
            raise DataError(
                f"{cfg.display_name} domain {spec.key} has no list file name in the YAML; use --image_list"
            )
        path = Path(image_list_dir) / name
        if not path.is_file():
            raise DataNotFoundError(f"image list {path} for domain {spec.key} ({split}) not found in --image_list_dir")
        return path
    if not cfg.requires_image_lists:
        return None
    if data_dir is None:
        raise DataNotFoundError(f"{cfg.display_name} needs --data_dir (and its image lists). {_where_to_get(cfg)}")
    tried = [data_dir / sub / name for sub in LIST_SEARCH_SUBDIRS]
    for path in tried:
        if path.is_file():
            return path
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({split}) needs the image list {name}: looked in "
        f"{', '.join(str(p.parent) for p in tried)}. Pass --image_list_dir or --image_list {spec.key}=FILE. "
        f"{_where_to_get(cfg)}"
    )


def _check_class_count(cfg: BenchmarkConfig, ds: HFDataset, where: str) -> None:
    if len(classes_of(ds)) != cfg.num_classes:
        raise ClassMismatchError(
            f"{where} has {len(classes_of(ds))} classes but {cfg.display_name} has {cfg.num_classes}: is this the "
            f"right folder, and is the download complete? {_where_to_get(cfg)}"
        )


def _load_torchvision_digits(cfg, spec, split, data_dir, download) -> HFDataset:
    from torchvision import datasets as tvd

    if data_dir is None:
        raise DataNotFoundError(f"digits need --data_dir (torchvision files live there). {_where_to_get(cfg)}")
    train = split == "train"
    name = spec.name.lower()
    builders = {
        "mnist": (lambda: tvd.MNIST(str(data_dir), train=train, download=download), "MNIST/raw/*-ubyte"),
        "usps": (lambda: tvd.USPS(str(data_dir), train=train, download=download), "usps.bz2 / usps.t.bz2"),
        "svhn": (lambda: tvd.SVHN(str(data_dir), split=split, download=download), f"{split}_32x32.mat"),
    }
    if name not in builders:
        raise DataError(f"no torchvision loader for digits domain {spec.name!r}; known: {sorted(builders)}")
    build, files = builders[name]
    try:
        base = build()
    except (RuntimeError, OSError, ValueError) as exc:
        hint = (
            "the download failed (no network?); fetch the files elsewhere and copy them into --data_dir"
            if download
            else "pass --download to let torchvision fetch it into --data_dir, or copy the files there"
        )
        raise DataNotFoundError(
            f"{spec.name.upper()} ({split}) not found or unreadable under {data_dir} (expected {files}): "
            f"{sentence(exc)}. "
            f"{hint}. {_where_to_get(cfg)}"
        ) from exc
    classes = cfg.classes or [str(i) for i in range(cfg.num_classes)]
    images = np.asarray(base.data)
    if images.ndim == 4:  # SVHN: N, C, H, W
        images = images.transpose(0, 2, 3, 1)
    labels = getattr(base, "targets", None)
    labels = base.labels if labels is None else labels
    data = {"image": list(images), "label": [int(y) for y in labels]}
    return HFDataset.from_dict(data, features=image_features(classes))


def load_hf_dataset(
    dataset_id: str, split: str, flag: str, name: str | None = None, cache_dir: str | None = None, hint: str = ""
) -> HFDataset:
    """``datasets.load_dataset`` (Hub id or local files) or ``load_from_disk`` (a ``save_to_disk`` folder), with
    errors that name ``flag`` and the fix; ``hint`` is added to the offline message."""
    import datasets as hfds

    local = Path(dataset_id)
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():  # written by save_to_disk
        ds = hfds.load_from_disk(str(local))
        if isinstance(ds, hfds.DatasetDict):
            if split not in ds:
                raise DataError(f"{flag} {dataset_id!r} has splits {list(ds)}, not {split!r}: pass the split flag")
            ds = ds[split]
        return ds
    try:
        return hfds.load_dataset(dataset_id, name=name, split=split, cache_dir=cache_dir)
    except ConnectionError as exc:
        raise DataNotFoundError(
            f"{flag}: could not reach the Hub for dataset {dataset_id!r} ({exc}). If you are offline, download it "
            f"once with network access (it is then cached) and set HF_HUB_OFFLINE=1, or use a local path.{hint}"
        ) from exc
    except (FileNotFoundError, hfds.exceptions.DatasetNotFoundError) as exc:
        raise DataNotFoundError(
            f"{flag}: no dataset {dataset_id!r} on the Hub or on disk (or it is private/gated: log in with "
            f"`hf auth login`): {exc}"
        ) from exc
    except ValueError as exc:  # unknown config name or split
        extra = (
            f" The dataset has no config {name!r}; if one config holds all domains, pass --domain_column with the "
            "column that names them."
            if name
            else ""
        )
        raise DataError(f"{flag}: cannot load split {split!r} of {dataset_id!r}: {sentence(exc)}.{extra}") from exc


def _load_hub(cfg, spec, split, dataset_id, domain_column, hub_config, cache_dir) -> HFDataset:
    import datasets as hfds

    if hub_config is not None:
        config_name = hub_config.format(domain=spec.folder, key=spec.key, name=spec.name) or None
    else:
        config_name = None if domain_column else spec.folder
    hint = f" Or use --data_dir with the files. {_where_to_get(cfg)}"
    ds = load_hf_dataset(dataset_id, split, "--dataset_id", config_name, cache_dir, hint)
    features = ds.features
    image_column, label_column = image_and_label_columns(ds)
    if image_column is None or label_column is None:
        raise DataError(f"{dataset_id!r} needs an Image column and a label column; found columns {list(features)}")
    if domain_column:
        if domain_column not in features:
            raise DataError(f"--domain_column {domain_column!r} not in {dataset_id!r}; columns: {list(features)}")
        feat = features[domain_column]
        values = ds[domain_column]
        if isinstance(feat, hfds.ClassLabel):
            values = [feat.int2str(int(v)) for v in values]
        keep = [i for i, v in enumerate(values) if spec.matches(str(v))]
        if not keep:
            raise DataError(
                f"no rows of {dataset_id!r} have {domain_column} = {spec.key}/{spec.name}; values present: "
                f"{sorted({str(v) for v in values})[:20]}"
            )
        ds = ds.select(keep)
    label_feat = features[label_column]
    if isinstance(label_feat, hfds.ClassLabel):
        classes = label_feat.names
    elif cfg.classes:
        classes = list(cfg.classes)
    else:
        raise DataError(
            f"{dataset_id!r}: label column {label_column!r} is not a ClassLabel, so class names are unknown; add "
            "'classes:' to the benchmark YAML"
        )
    return as_image_dataset(ds, image_column, label_column, classes)


def image_and_label_columns(ds: HFDataset) -> tuple[str | None, str | None]:
    """The ``Image`` column and the label column (a ``ClassLabel``, else one named label/labels) of a dataset."""
    features = ds.features
    image = next((k for k, f in features.items() if isinstance(f, HFImage)), None)
    label = next((k for k, f in features.items() if isinstance(f, ClassLabel)), None)
    if label is None:
        label = next((k for k in ("label", "labels") if k in features), None)
    return image, label


def as_image_dataset(ds: HFDataset, image_column: str, label_column: str | None, classes=None) -> HFDataset:
    """A loaded dataset in the recipes' schema (columns ``image`` and ``label``, see `image_features`)."""
    ds = ds.select_columns([image_column] + ([label_column] if label_column else []))
    ds = ds.rename_columns({image_column: "image", **({label_column: "label"} if label_column else {})})
    features = image_features(classes if label_column else None)
    for column, feature in features.items():
        ds = ds.cast_column(column, feature)
    return ds


def load_domain(
    benchmark: BenchmarkConfig | str,
    domain: str | DomainSpec,
    data_dir: str | os.PathLike | None = None,
    image_list: str | os.PathLike | None = None,
    dataset_id: str | None = None,
    *,
    split: str = "train",
    image_list_dir: str | os.PathLike | None = None,
    domain_column: str | None = None,
    hub_config: str | None = None,
    cache_dir: str | None = None,
    download: bool = False,
    verify: str = "none",
) -> HFDataset:
    """Load one domain of a benchmark as a ``datasets.Dataset`` with columns ``image`` (``Image(decode=False)``) and
    ``label`` (a ``ClassLabel`` naming the classes); `transformed` adds the pixel values.

    Source precedence: ``dataset_id`` (``datasets.load_dataset``: Hub id or local path; one config per domain, or
    ``domain_column``), then image lists (``image_list``, ``image_list_dir``, or the shipped lists of benchmarks
    that need them), then the ImageFolder tree ``data_dir/<domain folder>``; digits use torchvision loaders.
    ``split`` is "train" or "test" (benchmarks without an official split use the whole domain for both).
    ``hub_config`` is the dataset config name, a template where ``{domain}``, ``{key}`` and ``{name}`` are replaced
    by the domain's folder, key and name (default ``{domain}``, or no config with ``domain_column``).
    """
    cfg = load_benchmark_config(benchmark) if isinstance(benchmark, str) else benchmark
    spec = _domain_spec(cfg, domain)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data_dir) if data_dir is not None else None
    if data_dir is not None and not dataset_id and not download and not data_dir.is_dir():
        raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(cfg)}")

    if dataset_id:
        ds = _load_hub(cfg, spec, split, dataset_id, domain_column, hub_config, cache_dir)
        where = f"Hub dataset {dataset_id!r} (domain {spec.key})"
    elif cfg.loader == "torchvision":
        ds = _load_torchvision_digits(cfg, spec, split, data_dir, download)
        where = f"{spec.name} under {data_dir}"
    else:
        list_file = _find_list_file(cfg, spec, split, data_dir, image_list, image_list_dir)
        if list_file is not None:
            root = data_dir if data_dir is not None else list_file.parent
            if not root.is_dir():
                raise DataNotFoundError(f"--data_dir {root} does not exist. {_where_to_get(cfg)}")
            classes, samples = read_image_list(list_file, root, cfg.classes)
            ds = files_dataset(*zip(*samples), classes)
            where = f"image list {list_file}"
        else:
            if data_dir is None:
                raise DataNotFoundError(f"no data source for domain {spec.key}: pass --data_dir. {_where_to_get(cfg)}")
            root = _domain_root(cfg, spec, data_dir)
            classes, samples = scan_image_folder(root)
            ds = files_dataset(*zip(*samples), classes)
            where = str(root)
    _check_class_count(cfg, ds, where)
    verify_images(ds, verify, spec.key)
    return ds


# --------------------------------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------------------------------


def check_same_classes(
    source: HFDataset | Sequence[str], target: HFDataset | Sequence[str], names: tuple[str, str] = ("source", "target")
) -> None:
    """Raise :class:`ClassMismatchError` listing the difference unless both (datasets or class lists) share one class
    list (order too: the label indices must mean the same class). ``names`` name the two in the message."""
    a, b = (classes_of(x) if isinstance(x, HFDataset) else list(x) for x in (source, target))
    if a == b:
        return
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    parts = []
    if only_a:
        parts.append(f"only in {names[0]}: {only_a[:20]}{' ...' if len(only_a) > 20 else ''}")
    if only_b:
        parts.append(f"only in {names[1]}: {only_b[:20]}{' ...' if len(only_b) > 20 else ''}")
    if not parts:
        moved = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y][:5]
        parts.append(
            "same names in a different label order, e.g. " + ", ".join(f"#{i}: {x} vs {y}" for i, x, y in moved)
        )
    raise ClassMismatchError(
        f"{names[0]} and {names[1]} have different classes ({'; '.join(parts)}). Both domains must use the same "
        "class folders / label numbering"
    )


def partial_target_classes(classes: Sequence[str], num_classes: int) -> list[int]:
    """Label indices of the first ``num_classes`` class names in alphabetical order (partial-set protocol)."""
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"cannot keep {num_classes} of {len(classes)} classes")
    keep = set(sorted(classes)[:num_classes])
    return [i for i, c in enumerate(classes) if c in keep]


def filter_classes(dataset: HFDataset, keep: Sequence[int]) -> HFDataset:
    """The rows whose label is in ``keep``; the ``ClassLabel`` (and label indices) stay the full set."""
    keep_set = set(keep)
    return dataset.select([i for i, y in enumerate(labels_of(dataset)) if y in keep_set])


def partial_target(dataset: HFDataset, benchmark: BenchmarkConfig) -> HFDataset:
    """The benchmark's partial-set target (Office-Home: first 25 classes alphabetically)."""
    if not benchmark.partial.available:
        raise ConfigError(f"{benchmark.display_name} has no partial-set protocol")
    keep = partial_target_classes(classes_of(dataset), benchmark.partial.num_target_classes)
    return filter_classes(dataset, keep)


# --------------------------------------------------------------------------------------------------------------------
# DataLoader
# --------------------------------------------------------------------------------------------------------------------


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def default_num_workers(max_workers: int = 8) -> int:
    """One worker per available CPU, at most ``max_workers`` (decoding + augmenting is CPU-bound)."""
    return min(max_workers, available_cpus())


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32  # DataLoader gives each worker base_seed + worker_id
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def dataloader_kwargs(
    num_workers: int | None = None,
    *,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
) -> dict[str, Any]:
    """DataLoader throughput settings for this machine, to splat into any DataLoader (e.g.
    ``cmkd.data.make_paired_dataloader(..., **dataloader_kwargs())``): workers = available CPUs (at most 8),
    pinned memory only when CUDA is present, persistent workers and prefetching when there are workers."""
    if num_workers is None:
        num_workers = default_num_workers()
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    kwargs: dict[str, Any] = {
        "num_workers": num_workers,
        "pin_memory": torch.cuda.is_available() if pin_memory is None else pin_memory,
    }
    if num_workers > 0:
        kwargs.update(
            persistent_workers=True if persistent_workers is None else persistent_workers,
            prefetch_factor=prefetch_factor,
            worker_init_fn=_seed_worker,
        )
    return kwargs


def build_dataloader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool = False,
    num_workers: int | None = None,
    seed: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    prefetch_factor: int | None = 2,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader set up to keep the model busy: worker processes, pinned memory when CUDA is present, workers that
    persist across epochs, prefetching, and seeded shuffling/augmentation when ``seed`` is given."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    kwargs = dataloader_kwargs(
        num_workers, pin_memory=pin_memory, persistent_workers=persistent_workers, prefetch_factor=prefetch_factor
    )
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=generator,
        collate_fn=collate_fn,
        **kwargs,
    )
