"""The recipes' data: benchmark domains, a target without labels, the data flags, and one task's datasets.

Every loader returns a ``datasets.Dataset`` in one schema: ``image`` (``Image(decode=False)``: a file reference that
the transform decodes, so an unreadable file is reported by name) and, when labeled, ``label`` as a ``ClassLabel``.
Domains come from ``load_dataset("imagefolder")`` (``<data_dir>/<domain folder>/<class>/<images>``), the benchmarks'
image lists (``relative/path label`` lines), a ``datasets`` id (``--dataset_id``) or torchvision (digits). UDA needs
no target labels: ``--target_dir`` (flat folder), ``--target_list`` (one path per line) or ``--target_dataset_id``
give the target; ``--eval_dir/--eval_list/--eval_dataset_id`` a labeled copy used for reporting only (alone, also the
target, its labels dropped). Every failure a user can cause is a :class:`DataError` saying how to fix it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage

from cmkd.data import with_image_transform
from cmkd.transforms import build_transform, image_size_from_processor, normalization_from_processor

from .config import BenchmarkConfig, ConfigError, DomainSpec, load_benchmark_config

TARGET_FLAGS = ("target_dir", "target_list", "target_dataset_id")
EVAL_FLAGS = ("eval_dir", "eval_list", "eval_dataset_id")
LIST_SEARCH_SUBDIRS = ("", "image_list", "list")  # where shipped image lists live relative to --data_dir


class DataError(RuntimeError):
    """The data on disk / on the Hub cannot be used as asked; the message says how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A folder, list file or dataset is missing."""


class ClassMismatchError(DataError):
    """Source and target (or the data and the benchmark) disagree on the classes."""


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded."""


def _clause(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__


@dataclass
class DataArguments:
    """The data flags of every recipe (parsed with ``transformers.HfArgumentParser``)."""

    data_dir: str | None = field(default=None, metadata={"help": "benchmark folder as it ships (docs/datasets.md)"})
    image_list_dir: str | None = field(default=None, metadata={"help": "folder of per-domain image-list files"})
    image_list: list[str] = field(
        default_factory=list,
        metadata={
            "help": "image lists per domain ('relative/path label' lines, paths relative to --data_dir)",
            "metavar": "DOMAIN=FILE",
        },
    )
    dataset_id: str | None = field(default=None, metadata={"help": "datasets id or local path of the benchmark"})
    domain_column: str | None = field(default=None, metadata={"help": "with --dataset_id: column naming the domain"})
    dataset_config: str | None = field(
        default=None, metadata={"help": "with --dataset_id: config name; {domain}, {key}, {name} are filled in"}
    )
    download: bool = field(default=False, metadata={"help": "digits only: let torchvision download into --data_dir"})
    verify_images: Literal["none", "header", "full"] = field(
        default="none", metadata={"help": "check every image before training (header: PIL open, full: decode)"}
    )
    num_workers: int | None = field(default=None, metadata={"help": "DataLoader workers (default: CPUs, at most 8)"})
    target_dir: str | None = field(default=None, metadata={"help": "flat folder of unlabeled target images"})
    target_list: str | None = field(default=None, metadata={"help": "text file, one target image path per line"})
    target_dataset_id: str | None = field(default=None, metadata={"help": "datasets id/path of unlabeled images"})
    target_split: str = field(default="train", metadata={"help": "split of --target_dataset_id"})
    eval_dir: str | None = field(default=None, metadata={"help": "labeled target <dir>/<class>/<images> (reporting)"})
    eval_list: str | None = field(default=None, metadata={"help": "labeled target list ('relative/path label')"})
    eval_dataset_id: str | None = field(default=None, metadata={"help": "datasets id/path of a labeled target"})
    eval_split: str = field(default="train", metadata={"help": "split of --eval_dataset_id"})
    source_val_fraction: float = field(
        default=0.0, metadata={"help": "source fraction held out (stratified) for the source_accuracy/dev validators"}
    )

    def given(self, flags: Sequence[str]) -> list[str]:
        return [f for f in flags if getattr(self, f)]

    def image_lists(self, bench: BenchmarkConfig) -> dict[str, Path]:
        """``--image_list DOMAIN=FILE ...`` by domain key."""
        if any("=" not in item for item in self.image_list):
            raise ConfigError(f"--image_list expects DOMAIN=FILE, got {self.image_list!r}")
        return {bench.domain(d).key: Path(f) for d, f in (item.split("=", 1) for item in self.image_list)}

    def custom_target(self, target: str | None = None) -> str | None:
        """Task name of a target given by --target_*/--eval_* (None: the target is a benchmark domain)."""
        path = next((str(getattr(self, f)) for f in self.given((*TARGET_FLAGS, *EVAL_FLAGS))), None)
        if path is None or target:
            return str(target) if path else None
        return (Path(path).name if path.endswith("/") else Path(path).stem) or "target"

    def labeled_target(self, bench: BenchmarkConfig, target_key: str) -> bool:
        """Whether target labels exist for reporting: a benchmark domain, or an --eval_* set."""
        return target_key in bench.domains or bool(self.given(EVAL_FLAGS))

    def check(self, bench: BenchmarkConfig, tasks: list[tuple[str, str]], *, all_tasks: bool) -> None:
        """Every data-flag check that needs no image scan: ConfigError for flag combinations, DataNotFoundError for
        missing folders and files."""
        self.check_target_flags(bench, [t for _, t in tasks], all_tasks=all_tasks)
        lists = self.image_lists(bench)
        if self.dataset_id and (self.image_list_dir or lists):
            raise ConfigError(
                "--dataset_id reads images from the Hub; drop --image_list_dir/--image_list (or --dataset_id)"
            )
        if self.download and bench.loader != "torchvision":
            raise ConfigError(
                f"--download only applies to torchvision datasets (digits); {bench.display_name} must be "
                "downloaded by hand, see docs/datasets.md"
            )
        if (self.domain_column or self.dataset_config) and not self.dataset_id:
            raise ConfigError("--domain_column/--dataset_config only apply with --dataset_id")
        if bench.loader == "torchvision" and (self.image_list_dir or lists):
            raise ConfigError(
                f"{bench.display_name} is read with torchvision loaders; --image_list(_dir) does not apply"
            )
        if not self.dataset_id and not self.data_dir and not lists:
            raise ConfigError(
                f"no data given: pass --data_dir (the {bench.display_name} folder as it ships) or "
                "--dataset_id; see docs/datasets.md"
            )
        for key in sorted({k for task in tasks for k in task} - set(bench.domains)):
            self._check_custom_target(bench, key)
        data_dir = Path(self.data_dir) if self.data_dir else None
        if self.dataset_id:
            return  # a datasets id (Hub or local) explains its own errors
        if data_dir is not None and not self.download and not data_dir.is_dir():
            raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(bench)}")
        splits = sorted({"train", bench.eval_split})
        for key in sorted({k for task in tasks for k in task} & set(bench.domains)):
            for split in splits if bench.loader != "torchvision" else ():
                spec = bench.domains[key]
                if _find_list_file(bench, spec, split, self) is None and data_dir is not None:
                    _domain_root(bench, spec, data_dir)

    def check_target_flags(self, bench: BenchmarkConfig, targets: list[str], *, all_tasks: bool) -> None:
        """--target_*/--eval_* against --target/--all and each other, and --source_val_fraction's range."""
        custom = self.given((*TARGET_FLAGS, *EVAL_FLAGS))
        if custom and all_tasks:
            raise ConfigError(f"--{custom[0]} gives one target; run one task with --source instead of --all")
        for name in targets if custom else ():  # a name given by --target, not the one derived from the flag's path
            if name != self.custom_target() and any(d.matches(name) for d in bench.domains.values()):
                raise ConfigError(
                    f"--target {name} is a domain of {bench.display_name}, but --{custom[0]} gives the target images: "
                    f"drop --target (or use it as a new name, e.g. --target photos), or drop --{custom[0]} to use the "
                    "benchmark's domain"
                )
        for flags, what in ((TARGET_FLAGS, "unlabeled"), (EVAL_FLAGS, "labeled")):
            if len(self.given(flags)) > 1:
                given = ", ".join(f"--{f}" for f in self.given(flags))
                raise ConfigError(f"give the {what} target once: {given} are alternatives")
        if not 0.0 <= self.source_val_fraction < 1.0:
            raise ConfigError(f"--source_val_fraction must be in [0, 1), got {self.source_val_fraction}")

    def _check_custom_target(self, bench: BenchmarkConfig, target: str) -> None:
        """The files of --target_dir/--target_list/--eval_dir/--eval_list exist and are a folder / a file; a local
        --*_dataset_id path exists (a Hub id is left to ``datasets``). Their contents are checked when loaded."""
        given = [(f, Path(getattr(self, f)).expanduser()) for f in self.given((*TARGET_FLAGS, *EVAL_FLAGS))]
        if not given:
            raise ConfigError(
                f"target {target!r} is not a domain of {bench.display_name}: pass one of its domains with --target, "
                "or give the target images with --target_dir, --target_list or --target_dataset_id"
            )
        for flag, path in given:
            if flag.endswith("_dir") and not path.is_dir():
                what = "is a file, not a folder" if path.exists() else "does not exist"
                raise DataNotFoundError(f"--{flag} {path} {what}; it takes a folder of images")
            if flag.endswith("_list") and not path.is_file():
                what = "is a folder, not a file" if path.exists() else "does not exist"
                raise DataNotFoundError(f"--{flag} {path} {what}; it takes a text file of image paths")
            if flag.endswith("_dataset_id") and str(path).startswith((".", "/", "~")) and not path.exists():
                raise DataNotFoundError(
                    f"--{flag} {path} does not exist (a local path; a Hub id has no leading . / ~)"
                )


# ------------------------------------------------------------------------------------------------ layout for messages
def expected_layout(cfg: BenchmarkConfig) -> str:
    """The folder tree a benchmark expects under --data_dir, as text for error messages."""
    if cfg.loader == "torchvision":
        return (
            "<data_dir>/\n  MNIST/raw/*-ubyte (train/t10k images and labels)\n  usps.bz2, usps.t.bz2\n  "
            "train_32x32.mat, test_32x32.mat   (SVHN)"
        )
    inner = "<image files>" if cfg.requires_image_lists else "<class name>/<image files>"
    lines = ["<data_dir>/", *(f"  {spec.folder}/{inner}" for spec in cfg.domains.values())]
    list_names = sorted({name for spec in cfg.domains.values() for name in spec.list_files.values()})
    if list_names:
        req = "required" if cfg.requires_image_lists else "optional, with --image_list_dir"
        lines.append(f"  {list_names[0]}, ... ({req}; in <data_dir>, <data_dir>/image_list or <data_dir>/list;")
        lines.append('   one "relative/path label" per line, paths relative to <data_dir>)')
    return "\n".join(lines)


def _where_to_get(cfg: BenchmarkConfig) -> str:
    anchor = cfg.display_name.lower().replace(" ", "-").replace(".", "")
    return (
        f"Get {cfg.display_name} from {cfg.homepage or 'its official page'} (licence: {cfg.license or 'see the page'})"
        f" and lay it out as:\n{expected_layout(cfg)}\nDetails: docs/datasets.md#{anchor}"
    )


# ------------------------------------------------------------------------------------------------ datasets
def files_dataset(paths: Sequence[str], labels: Sequence[int] | None = None, classes=None) -> Dataset:
    """Images (paths as str, or arrays) + labels named by ``classes``, in the recipes' schema; no file is opened."""
    data, features = {"image": list(paths)}, {"image": Image(decode=False)}
    if labels is not None:
        data["label"], features["label"] = [int(y) for y in labels], ClassLabel(names=list(classes))
    return Dataset.from_dict(data, features=Features(features))


def image_paths(ds: Dataset) -> list[str | None]:
    return [v.get("path") if isinstance(v, dict) else None for v in ds.select_columns(["image"])["image"]]


def labels_of(ds: Dataset) -> list[int]:
    return list(ds.select_columns(["label"])["label"])


def classes_of(ds: Dataset) -> list[str]:
    return list(ds.features["label"].names)


def _imagefolder(root: Path, labeled: bool, cache_dir: str | None = None) -> Dataset | None:
    """``load_dataset("imagefolder")`` over every image under ``root`` (labels: parent folder names); None if none."""
    try:
        ds = datasets.load_dataset(
            "imagefolder",
            data_files={"train": str(root / "**")},
            split="train",
            drop_labels=not labeled,
            cache_dir=cache_dir,
        )
    except ValueError:  # "corresponds to no data": no image file
        return None
    return ds.cast_column("image", Image(decode=False))


def scan_image_folder(root: str | os.PathLike, cache_dir: str | None = None) -> Dataset:
    """``root/<class>/<image>`` as a labeled dataset (classes sorted). A class folder without images is an error."""
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
    ds = _imagefolder(root, labeled=True, cache_dir=cache_dir)
    empty = [c for c in classes if ds is None or c not in classes_of(ds)]
    if empty:
        raise DataError(
            f"{len(empty)} class folder(s) under {root} hold no images ({', '.join(empty[:20])}"
            f"{', ...' if len(empty) > 20 else ''}). Every domain needs every class: finish the "
            "download/extraction or remove stray folders"
        )
    return ds


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


def _list_lines(list_file: Path) -> list[tuple[int, str]]:
    lines = enumerate(read_list_text(list_file).splitlines(), 1)
    return [(n, s) for n, line in lines if (s := line.strip()) and not s.startswith("#")]


def _check_exist(paths: list[str], list_file: Path, where: str, hint: str) -> None:
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {list_file} do not exist{where}, "
            f"e.g. {', '.join(missing[:5])}{hint}"
        )


def read_image_list(list_file: str | os.PathLike, root=None, classes: Sequence[str] | None = None) -> Dataset:
    """A "relative/path label" list (paths relative to ``root``, default: the list's folder) as a labeled dataset.
    Class names: ``classes`` (label order), else each label's parent folder name, which must be unambiguous."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    paths, labels = [], []
    for lineno, line in _list_lines(list_file):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{lineno}: expected 'relative/path label' (integer label), got {line!r}")
        if int(parts[1]) < 0:
            raise DataError(f"{list_file}:{lineno}: negative label {int(parts[1])}")
        paths.append(str(root / parts[0]))
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"{list_file} lists no images")
    _check_exist(
        paths,
        list_file,
        f" under {root}",
        ". Paths in a list are relative to --data_dir; check that "
        "--data_dir points at the folder the list was written for",
    )
    n_labels = max(labels) + 1
    if classes is not None and n_labels > len(classes):
        raise ClassMismatchError(
            f"{list_file} uses label {n_labels - 1} but only {len(classes)} class names are known"
        )
    if classes is None:
        names: dict[int, set[str]] = {}
        for path, label in zip(paths, labels):
            names.setdefault(label, set()).add(Path(path).parent.name)
        ambiguous = {k: sorted(v)[:5] for k, v in names.items() if len(v) > 1}
        absent = sorted(set(range(n_labels)) - set(names))
        if ambiguous or absent:
            detail = (
                f"label {next(iter(ambiguous))} appears under folders {next(iter(ambiguous.values()))}"
                if ambiguous
                else f"labels {absent[:10]} never appear"
            )
            raise DataError(
                f"cannot name the classes of {list_file} from its paths ({detail}); add 'classes:' "
                "(names in label order) to the benchmark YAML"
            )
        classes = [next(iter(names[i])) for i in range(n_labels)]
    return files_dataset(paths, labels, classes)


def _read_path_list(list_file: Path) -> Dataset:
    """``--target_list``: one image path per line (relative to the list's folder), no labels."""
    rows = [(n, line, list_file.parent / line) for n, line in _list_lines(list_file)]
    labeled = [(n, line) for n, line, path in rows if not path.is_file() and _labeled_line(list_file.parent, line)]
    if labeled:
        raise DataError(
            f"--target_list {list_file}: {len(labeled)} of {len(rows)} lines look like 'path label' (line "
            f"{labeled[0][0]}: {labeled[0][1]!r}). That is a labeled image list: pass it as --eval_list to adapt on "
            "its images and report accuracy with its labels. --target_list takes one image path per line."
        )
    if not rows:
        raise DataError(f"--target_list {list_file} lists no images")
    paths = [str(path) for _, _, path in rows]
    _check_exist(paths, list_file, "", "; paths are relative to the list's folder")
    return files_dataset(paths)


def _labeled_line(root: Path, line: str) -> bool:
    head, _, tail = line.rpartition(" ")
    return bool(head) and tail.lstrip("-").isdigit() and (root / head).is_file()


def _read_flat_folder(root: Path) -> Dataset:
    """``--target_dir``: the images directly in ``root``; sub-folders with images mean a labeled ImageFolder."""
    ds = _imagefolder(root, labeled=False)
    rel = [Path(os.path.relpath(p, root)) for p in image_paths(ds)] if ds is not None else []
    subdirs = sorted({p.parts[0] for p in rel if len(p.parts) > 1})
    if subdirs:
        listed = ", ".join(f"{d}/" for d in subdirs[:5]) + (", ..." if len(subdirs) > 5 else "")
        found = f"{len(rel) - sum(len(p.parts) > 1 for p in rel)} images and " if len(rel) > 0 else ""
        raise DataError(
            f"--target_dir {root} holds {found}{len(subdirs)} sub-folders with images ({listed}). That is the "
            "layout of a labeled ImageFolder (one folder per class): pass it as --eval_dir to adapt on its images "
            "and report accuracy with its labels. --target_dir takes a flat folder of unlabeled images."
        )
    if ds is None:
        raise DataNotFoundError(f"--target_dir {root} holds no images; point it at the folder with the image files")
    return ds


# ------------------------------------------------------------------------------------------------ datasets ids
def load_hf_dataset(dataset_id: str, split: str, flag: str, name: str | None = None, cache_dir=None) -> Dataset:
    """``load_dataset`` (Hub id or local files) or ``load_from_disk`` (a ``save_to_disk`` folder), with errors that
    name ``flag`` and the fix."""
    local = Path(dataset_id)
    if (local / "state.json").is_file() or (local / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(str(local))
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise DataError(f"{flag} {dataset_id!r} has splits {list(ds)}, not {split!r}: pass the split flag")
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(dataset_id, name=name, split=split, cache_dir=cache_dir)
    except ConnectionError as exc:
        raise DataNotFoundError(
            f"{flag}: could not reach the Hub for dataset {dataset_id!r} ({exc}). If you are offline, download it "
            "once with network access (it is then cached) and set HF_HUB_OFFLINE=1, or use a local path (or "
            "--data_dir with the files)"
        ) from exc
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataNotFoundError(
            f"{flag}: no dataset {dataset_id!r} on the Hub or on disk (or it is private/gated: log in with "
            f"`hf auth login`): {exc}"
        ) from exc
    except ValueError as exc:  # unknown config name or split
        extra = " If one config holds all domains, pass --domain_column with the column naming them." if name else ""
        raise DataError(f"{flag}: cannot load split {split!r} of {dataset_id!r}: {_clause(exc)}.{extra}") from exc


def _in_schema(ds: Dataset, flag: str, labeled: bool | None, classes: Sequence[str] | None = None) -> Dataset:
    """A loaded dataset as ``image`` (+ ``label``). ``labeled``: True needs a label column, False refuses one;
    ``flag`` names the flag and value in messages."""
    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, Image)), None)
    label = next((k for k, f in feats.items() if isinstance(f, ClassLabel)), None)
    label = label or next((k for k in ("label", "labels") if k in feats), None)
    if image is None or (labeled and label is None):
        need = "an Image column" + (" and a label column" if labeled is not False else "")
        hint = " Without labels it is an unlabeled target: --target_dataset_id." if image and labeled else ""
        raise DataError(f"{flag} needs {need}; columns {list(feats)}.{hint}")
    if labeled is False and label is not None:
        raise DataError(
            f"{flag} has a label column {label!r}: a labeled dataset. Pass it as --eval_dataset_id to adapt on its "
            "images and report accuracy with its labels; --target_dataset_id takes images without labels."
        )
    if labeled is False:
        return ds.select_columns([image]).rename_columns({image: "image"}).cast_column("image", Image(decode=False))
    classes = getattr(feats[label], "names", None) or classes
    if not classes:
        raise DataError(
            f"{flag}: label column {label!r} is not a ClassLabel, so class names are unknown; add "
            "'classes:' to the benchmark YAML"
        )
    ds = ds.select_columns([image, label]).rename_columns({image: "image", label: "label"})
    return ds.cast(Features({"image": Image(decode=False), "label": ClassLabel(names=list(classes))}))


# ------------------------------------------------------------------------------------------------ benchmark domains
def _domain_root(cfg: BenchmarkConfig, spec: DomainSpec, data_dir: Path) -> Path:
    tried = [data_dir / f for f in (spec.folder, *spec.alt_folders)]
    for path in tried:
        if path.is_dir():
            return path
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({spec.name}) not found: looked for "
        f"{' and '.join(str(p) for p in tried)}. {_where_to_get(cfg)}"
    )


def _find_list_file(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data: DataArguments) -> Path | None:
    """The image list of a domain: --image_list, else --image_list_dir, else (when the benchmark needs lists) the
    shipped one under --data_dir; None: read the domain's folder."""
    name, given = spec.list_files.get(split), data.image_lists(cfg).get(spec.key)
    if given is not None and not given.is_file():
        raise DataNotFoundError(f"image list {given} (domain {spec.key}) does not exist")
    if given is not None or (data.image_list_dir is None and not cfg.requires_image_lists):
        return given
    if data.image_list_dir is not None:
        if not name:
            raise DataError(
                f"{cfg.display_name} domain {spec.key} has no list file name in the YAML; use --image_list"
            )
        if not (Path(data.image_list_dir) / name).is_file():
            raise DataNotFoundError(
                f"image list {Path(data.image_list_dir) / name} for domain {spec.key} ({split}) "
                "not found in --image_list_dir"
            )
        return Path(data.image_list_dir) / name
    if data.data_dir is None:
        raise DataNotFoundError(f"{cfg.display_name} needs --data_dir (and its image lists). {_where_to_get(cfg)}")
    tried = [Path(data.data_dir) / sub / name for sub in LIST_SEARCH_SUBDIRS]
    found = next((p for p in tried if p.is_file()), None)
    if found is None:
        raise DataNotFoundError(
            f"{cfg.display_name} domain {spec.key} ({split}) needs the image list {name}: looked in "
            f"{', '.join(str(p.parent) for p in tried)}. Pass --image_list_dir or --image_list {spec.key}=FILE. "
            f"{_where_to_get(cfg)}"
        )
    return found


def _load_digits(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data_dir: Path | None, download: bool):
    from torchvision import datasets as tvd

    if data_dir is None:
        raise DataNotFoundError(f"digits need --data_dir (torchvision files live there). {_where_to_get(cfg)}")
    root, train = str(data_dir), split == "train"
    builders = {
        "mnist": (lambda: tvd.MNIST(root, train=train, download=download), "MNIST/raw/*-ubyte"),
        "usps": (lambda: tvd.USPS(root, train=train, download=download), "usps.bz2 / usps.t.bz2"),
        "svhn": (lambda: tvd.SVHN(root, split=split, download=download), f"{split}_32x32.mat"),
    }
    if spec.name.lower() not in builders:
        raise DataError(f"no torchvision loader for digits domain {spec.name!r}; known: {sorted(builders)}")
    build, files = builders[spec.name.lower()]
    try:
        base = build()
    except (RuntimeError, OSError, ValueError) as exc:
        hint = (
            "the download failed (no network?); fetch the files elsewhere and copy them into --data_dir"
            if download
            else "pass --download to let torchvision fetch it into --data_dir, or copy the files there"
        )
        raise DataNotFoundError(
            f"{spec.name.upper()} ({split}) not found or unreadable under {data_dir} (expected "
            f"{files}): {_clause(exc)}. {hint}. {_where_to_get(cfg)}"
        ) from exc
    images = np.asarray(base.data)
    images = images.transpose(0, 2, 3, 1) if images.ndim == 4 else images  # SVHN: N, C, H, W
    labels = base.labels if getattr(base, "targets", None) is None else base.targets
    classes = cfg.classes or [str(i) for i in range(cfg.num_classes)]
    return files_dataset(list(images), labels, classes)


def _load_hub(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data: DataArguments, cache_dir=None) -> Dataset:
    config = data.dataset_config or ("" if data.domain_column else "{domain}")
    name = config.format(domain=spec.folder, key=spec.key, name=spec.name) or None
    ds = load_hf_dataset(data.dataset_id, split, "--dataset_id", name, cache_dir)
    if data.domain_column:
        column = data.domain_column
        if column not in ds.features:
            raise DataError(f"--domain_column {column!r} not in {data.dataset_id!r}; columns: {list(ds.features)}")
        names = getattr(ds.features[column], "int2str", str)
        values = [str(names(v)) for v in ds[column]]
        keep = [i for i, v in enumerate(values) if spec.matches(v)]
        if not keep:
            raise DataError(
                f"no rows of {data.dataset_id!r} have {column} = {spec.key}/{spec.name}; values "
                f"present: {sorted(set(values))[:20]}"
            )
        ds = ds.select(keep)
    return _in_schema(ds, f"--dataset_id {data.dataset_id!r}", True, cfg.classes)


def load_domain(
    bench: BenchmarkConfig | str,
    domain: str | DomainSpec,
    data: DataArguments | None = None,
    *,
    split: str = "train",
    cache_dir: str | None = None,
    **flags: Any,
) -> Dataset:
    """One domain of a benchmark, labeled, from ``data`` (or ``DataArguments(**flags)``): ``--dataset_id``, else an
    image list (--image_list, --image_list_dir, or the shipped lists of benchmarks that need them), else the
    ImageFolder ``<data_dir>/<domain folder>``; digits come from torchvision. ``split``: "train" or "test"."""
    cfg = load_benchmark_config(bench) if isinstance(bench, str) else bench
    data = data or DataArguments(**flags)
    try:
        spec = domain if isinstance(domain, DomainSpec) else cfg.domain(domain)
    except ConfigError as exc:
        raise DataError(str(exc)) from exc
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data_dir = Path(data.data_dir) if data.data_dir else None
    if data_dir is not None and not data.dataset_id and not data.download and not data_dir.is_dir():
        raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(cfg)}")
    if data.dataset_id:
        ds, where = _load_hub(cfg, spec, split, data, cache_dir), f"Hub dataset {data.dataset_id!r} ({spec.key})"
    elif cfg.loader == "torchvision":
        ds, where = _load_digits(cfg, spec, split, data_dir, data.download), f"{spec.name} under {data_dir}"
    elif (list_file := _find_list_file(cfg, spec, split, data)) is not None:
        ds, where = read_image_list(list_file, data_dir or list_file.parent, cfg.classes), f"image list {list_file}"
    elif data_dir is None:
        raise DataNotFoundError(f"no data source for domain {spec.key}: pass --data_dir. {_where_to_get(cfg)}")
    else:
        root = _domain_root(cfg, spec, data_dir)
        ds, where = scan_image_folder(root, cache_dir), str(root)
    if len(classes_of(ds)) != cfg.num_classes:
        raise ClassMismatchError(
            f"{where} has {len(classes_of(ds))} classes but {cfg.display_name} has {cfg.num_classes}: is this the "
            f"right folder, and is the download complete? {_where_to_get(cfg)}"
        )
    verify_images(ds, data.verify_images, spec.key)
    return ds


def verify_images(ds: Dataset, mode: str = "header", domain: str = "", max_report: int = 20) -> int:
    """Open every image file up front (``header``: PIL open; ``full``: decode) and raise one CorruptImageError listing
    the bad ones; returns the number checked."""
    if mode == "none":
        return 0

    def problem(path: str) -> str | None:
        try:
            with PILImage.open(path) as im:
                im.load() if mode == "full" else None
        except Exception as exc:  # noqa: BLE001 - any failure means the file is unusable
            return f"{path}: {type(exc).__name__}: {exc}"

    paths = [p for p in image_paths(ds) if p is not None]
    with ThreadPoolExecutor(max_workers=8) as pool:
        bad = [msg for msg in pool.map(problem, paths) if msg]
    if bad:
        more = f"\n  ... and {len(bad) - max_report} more" if len(bad) > max_report else ""
        raise CorruptImageError(
            f"{len(bad)} of {len(paths)} images of domain {domain!r} cannot be read:\n  "
            + "\n  ".join(bad[:max_report])
            + f"{more}\nRe-download / re-extract them, or delete them (and their "
            "image-list lines)"
        )
    return len(paths)


# ------------------------------------------------------------------------------------------------ targets
def load_unlabeled_target(data: DataArguments) -> Dataset:
    """The unlabeled target of --target_dir / --target_list / --target_dataset_id (an ``image`` column)."""
    if data.target_dir:
        root = Path(data.target_dir)
        if not root.is_dir():
            raise DataNotFoundError(f"--target_dir {root} is not a folder")
        return _read_flat_folder(root)
    if data.target_list:
        if not Path(data.target_list).is_file():
            raise DataNotFoundError(f"--target_list {data.target_list} does not exist")
        return _read_path_list(Path(data.target_list))
    ds = load_hf_dataset(data.target_dataset_id, data.target_split, "--target_dataset_id")
    return _in_schema(ds, f"--target_dataset_id {data.target_dataset_id!r}", False)


def load_labeled_eval(data: DataArguments, classes: Sequence[str]) -> Dataset:
    """The labeled target (reporting only) of --eval_dir / --eval_list / --eval_dataset_id; its classes must be the
    source's, in the same order."""
    if data.eval_dir:
        root = Path(data.eval_dir)
        if not root.is_dir():
            raise DataNotFoundError(f"--eval_dir {root} is not a folder")
        if not any(e.is_dir() for e in os.scandir(root)) and any(e.is_file() for e in os.scandir(root)):
            raise DataError(
                f"--eval_dir {root} holds images but no class sub-folders, so it has no labels: pass it "
                "as --target_dir (unlabeled target). --eval_dir takes <dir>/<class name>/<images>."
            )
        ds = scan_image_folder(root)
    elif data.eval_list:
        if not Path(data.eval_list).is_file():
            raise DataNotFoundError(f"--eval_list {data.eval_list} does not exist")
        try:
            ds = read_image_list(data.eval_list, None, classes)
        except DataError as exc:
            raise DataError(f"{exc}. An image list without labels is an unlabeled target: --target_list") from exc
    else:
        ds = load_hf_dataset(data.eval_dataset_id, data.eval_split, "--eval_dataset_id")
        ds = _in_schema(ds, f"--eval_dataset_id {data.eval_dataset_id!r}", True, classes)
    check_same_classes(list(classes), ds, ("the source", "the labeled target"))
    return ds


def split_source(source: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): a stratified, seeded ``fraction`` of the source that never enters training."""
    if fraction <= 0:
        return source, None
    try:
        parts = source.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as exc:  # too few images per class
        raise DataError(f"--source_val_fraction {fraction}: {_clause(exc)}; raise the fraction") from exc
    if len(parts["test"]) < 4:
        raise DataError(
            f"--source_val_fraction {fraction} holds out {len(parts['test'])} source images; the source "
            "validators need at least 4: raise the fraction"
        )
    return parts["train"], parts["test"]


# ------------------------------------------------------------------------------------------------ classes
def check_same_classes(source, target, names: tuple[str, str] = ("source", "target")) -> None:
    """ClassMismatchError listing the difference unless both (datasets or class lists) share one class list, order
    too (label indices must mean the same class)."""
    a, b = (classes_of(x) if isinstance(x, Dataset) else list(x) for x in (source, target))
    if a == b:
        return
    only = [(n, sorted(set(x) - set(y))) for n, x, y in ((names[0], a, b), (names[1], b, a))]
    parts = [f"only in {n}: {d[:20]}{' ...' if len(d) > 20 else ''}" for n, d in only if d]
    moved = [f"#{i}: {x} vs {y}" for i, (x, y) in enumerate(zip(a, b)) if x != y][:5]
    parts = parts or ["same names in a different label order, e.g. " + ", ".join(moved)]
    raise ClassMismatchError(
        f"{names[0]} and {names[1]} have different classes ({'; '.join(parts)}). Both domains "
        "must use the same class folders / label numbering"
    )


def partial_target_classes(classes: Sequence[str], num_classes: int) -> list[int]:
    """Label indices of the first ``num_classes`` class names in alphabetical order (partial-set protocol)."""
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"cannot keep {num_classes} of {len(classes)} classes")
    keep = set(sorted(classes)[:num_classes])
    return [i for i, c in enumerate(classes) if c in keep]


def filter_classes(ds: Dataset, keep: Sequence[int]) -> Dataset:
    """The rows whose label is in ``keep``; the ``ClassLabel`` (and label indices) stay the full set."""
    return ds.select([i for i, y in enumerate(labels_of(ds)) if y in set(keep)])


def partial_target(ds: Dataset, bench: BenchmarkConfig) -> Dataset:
    """The benchmark's partial-set target (Office-Home: first 25 classes alphabetically)."""
    if not bench.partial.available:
        raise ConfigError(f"{bench.display_name} has no partial-set protocol")
    return filter_classes(ds, partial_target_classes(classes_of(ds), bench.partial.num_target_classes))


# ------------------------------------------------------------------------------------------------ transforms
def open_rgb(image: Any) -> PILImage.Image:
    """An ``Image(decode=False)`` value (``{"path", "bytes"}``) or a PIL image, as RGB; unreadable: CorruptImageError
    naming the file."""
    if isinstance(image, PILImage.Image):
        return image.convert("RGB")
    path, raw = image.get("path"), image.get("bytes")
    try:
        with io.BytesIO(raw) if raw is not None else open(path, "rb") as fh:
            return PILImage.open(fh).convert("RGB")  # decodes while the file is open
    except (OSError, ValueError, TypeError, PILImage.DecompressionBombError) as exc:
        raise CorruptImageError(
            f"cannot read image {path or '(embedded bytes)'} ({type(exc).__name__}: {exc}). Replace or delete the "
            "file (and its image-list line), or run with --verify_images header to list every unreadable file up front"
        ) from exc


class DecodeThen:
    """Decode to RGB, then ``transform`` (a class, so datasets pickle for DataLoader workers)."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        return self.transform(open_rgb(image))


def transformed(ds: Dataset, transform: Callable, strong: Callable | None = None) -> Dataset:
    """``cmkd.data.with_image_transform``: items ``{"pixel_values", "labels"?, "pixel_values_strong"?}``."""
    return with_image_transform(ds, DecodeThen(transform), DecodeThen(strong) if strong is not None else None)


def bench_transform(bench: BenchmarkConfig, preset: str, *, image_size: int | None = None, processor=None):
    """``cmkd.transforms.build_transform(preset)`` at the model's input size and normalisation (from its image
    processor; the benchmark's size without one)."""
    mean, std = normalization_from_processor(processor)
    size = (
        image_size if image_size is not None else image_size_from_processor(processor, bench.augmentation.image_size)
    )
    return build_transform(preset, size, mean, std)


def default_num_workers(max_workers: int = 8) -> int:
    """One DataLoader worker per available CPU, at most ``max_workers`` (decoding + augmenting is CPU-bound)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(max_workers, cpus)


# ------------------------------------------------------------------------------------------------ one task
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
    processor=None,
) -> TaskData:
    """Source (minus --source_val_fraction), target without labels and the target's evaluation view, with the
    benchmark's presets at the model's input size; partial-set runs keep the benchmark's target classes."""
    src, src_val = split_source(load_domain(bench, source, data), data.source_val_fraction, seed)
    if target in bench.domains:
        tgt = load_domain(bench, target, data)
        tgt_eval = tgt if bench.eval_split == "train" else load_domain(bench, target, data, split=bench.eval_split)
        for ds in (tgt, tgt_eval):
            check_same_classes(src, ds, (f"source {source}", f"target {target}"))
        if partial:
            tgt, tgt_eval = partial_target(tgt, bench), partial_target(tgt_eval, bench)
    else:  # --target_* (no labels) and/or --eval_* (labeled, reporting only; alone, also the target)
        tgt_eval = load_labeled_eval(data, classes_of(src)) if data.given(EVAL_FLAGS) else None
        tgt = load_unlabeled_target(data) if data.given(TARGET_FLAGS) or tgt_eval is None else tgt_eval
        tgt_eval = tgt if tgt_eval is None else tgt_eval
    aug, size = bench.augmentation, {"image_size": image_size, "processor": processor}
    test = bench_transform(bench, aug.test, **size)
    return TaskData(
        source=transformed(src, bench_transform(bench, aug.train_preset(source, "source"), **size)),
        target=transformed(
            tgt.remove_columns([c for c in tgt.column_names if c != "image"]),  # adaptation never sees target labels
            bench_transform(bench, aug.train_preset(target, "target"), **size),
            bench_transform(bench, aug.strong, **size) if fixmatch else None,
        ),
        eval=transformed(tgt_eval, test),
        classes=classes_of(src),
        source_val=transformed(src_val, test) if src_val is not None else None,
    )
