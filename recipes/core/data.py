"""The recipes' data: the data flags, benchmark domains, a target without labels, and one task's datasets.

One schema everywhere: a ``datasets.Dataset`` with ``image`` (``Image(decode=False)``: decoded by the transform, so an
unreadable file is named) and, when labeled, a ``ClassLabel`` ``label``. UDA needs no target labels: ``--target_*``
give the target, ``--eval_*`` a labeled copy for reporting only. Errors say how to fix them (docs/datasets.md).
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
from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder
from PIL import Image as PILImage
from torchvision.transforms import Compose

from cmkd.data import with_image_transform
from cmkd.transforms import build_transform, image_size_from_processor, normalization_from_processor

from .config import BenchmarkConfig, ConfigError, DomainSpec, load_benchmark_config

TARGET_FLAGS = ("target_dir", "target_list", "target_dataset_id")
EVAL_FLAGS = ("eval_dir", "eval_list", "eval_dataset_id")
LIST_SEARCH_SUBDIRS = ("", "image_list", "list")  # where shipped image lists live relative to --data_dir
IMAGE_EXTENSIONS = tuple(ImageFolder.EXTENSIONS)  # what load_dataset("imagefolder") reads


class DataError(RuntimeError):
    """The data cannot be used as asked; the message says how to fix it."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A folder, list file or dataset is missing."""


class ClassMismatchError(DataError):
    """Source and target (or the data and the benchmark) disagree on the classes."""


class CorruptImageError(DataError):
    """An image file cannot be opened or decoded."""


def _arg(help: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataArguments:
    """The data flags of every recipe, for ``transformers.HfArgumentParser``."""

    data_dir: str | None = _arg("root folder of the benchmark as it ships (see docs/datasets.md)")
    image_list_dir: str | None = _arg("folder with per-domain image-list files ('relative/path label')")
    image_list: list[str] = field(
        default_factory=list,
        metadata={"help": "image lists by domain, paths relative to --data_dir", "metavar": "D=F"},
    )
    dataset_id: str | None = _arg("Hub dataset id or local path for datasets.load_dataset")
    domain_column: str | None = _arg("with --dataset_id: column naming each row's domain")
    dataset_config: str | None = _arg("with --dataset_id: config name; {domain}, {key}, {name} filled in per domain")
    download: bool = _arg("digits only: let torchvision download into --data_dir", False)
    verify_images: Literal["none", "header", "full"] = _arg(
        "check all images first (header: open; full: decode)", "none"
    )
    num_workers: int | None = _arg("DataLoader workers (default: CPUs available, at most 8)")
    target_dir: str | None = _arg("flat folder of unlabeled target images (replaces --target's domain)")
    target_list: str | None = _arg("text file, one target image path per line (relative to the file)")
    target_dataset_id: str | None = _arg("datasets id or path of unlabeled target images (no labels)")
    target_split: str = _arg("split of --target_dataset_id", "train")
    eval_dir: str | None = _arg("labeled target <dir>/<class>/<images>, for reporting accuracy only")
    eval_list: str | None = _arg("labeled target image list ('relative/path label' lines), for reporting only")
    eval_dataset_id: str | None = _arg("datasets id or path of a labeled target (image + label), for reporting only")
    eval_split: str = _arg("split of --eval_dataset_id", "train")
    source_val_fraction: float = _arg("source part held out (stratified) for source_accuracy/dev validators", 0.0)

    def given(self, flags: Sequence[str]) -> list[str]:
        return [f for f in flags if getattr(self, f)]

    def image_lists(self, bench: BenchmarkConfig) -> dict[str, Path]:
        """``--image_list DOMAIN=FILE ...`` by domain key."""
        if bad := [item for item in self.image_list if "=" not in item]:
            raise ConfigError(f"--image_list expects DOMAIN=FILE, got {bad[0]!r}")
        return {bench.domain(d).key: Path(f) for d, f in (item.split("=", 1) for item in self.image_list)}

    def custom_target(self, target: str | None = None) -> str | None:
        """Task name of a target given by --target_*/--eval_*: ``target``, else the path's name (None: the target is
        a benchmark domain)."""
        path = next((str(getattr(self, f)) for f in self.given((*TARGET_FLAGS, *EVAL_FLAGS))), None)
        if path is None or target:
            return str(target) if path else None
        return (Path(path).name if path.endswith("/") else Path(path).stem) or "target"

    def labeled_target(self, bench: BenchmarkConfig, target_key: str) -> bool:
        """Whether target labels exist for reporting: a benchmark domain, or an --eval_* set."""
        return target_key in bench.domains or bool(self.given(EVAL_FLAGS))

    def check(self, bench: BenchmarkConfig, tasks: list[tuple[str, str]], *, all_tasks: bool) -> None:
        """The data flags' combinations (ConfigError); ``check_files`` then looks at the disk."""
        self.check_target_flags(bench, [t for _, t in tasks], all_tasks=all_tasks)
        lists, name, digits = self.image_lists(bench), bench.display_name, bench.loader == "torchvision"
        if self.dataset_id and (self.image_list_dir or lists):
            raise ConfigError("--dataset_id reads images from the Hub; drop --image_list_dir/--image_list (or it)")
        if self.download and not digits:
            raise ConfigError(f"--download only applies to digits; get {name} by hand, see docs/datasets.md")
        if (self.domain_column or self.dataset_config) and not self.dataset_id:
            raise ConfigError("--domain_column/--dataset_config only apply with --dataset_id")
        if digits and (self.image_list_dir or lists):
            raise ConfigError(f"{name} is read with torchvision loaders; --image_list(_dir) does not apply")
        if not (self.dataset_id or self.data_dir or lists):
            raise ConfigError(f"no data given: pass --data_dir (the {name} folder as it ships) or --dataset_id")
        given = [(f, Path(getattr(self, f)).expanduser()) for f in self.given((*TARGET_FLAGS, *EVAL_FLAGS))]
        if not given and (unknown := sorted({k for task in tasks for k in task} - set(bench.domains))):
            raise ConfigError(
                f"target {unknown[0]!r} is not a domain of {name}: pass one of its domains with --target, or give the "
                "target images with --target_dir, --target_list or --target_dataset_id"
            )

    def check_files(self, bench: BenchmarkConfig, tasks: list[tuple[str, str]]) -> None:
        """The folders and files the flags name exist, without scanning images (DataNotFoundError)."""
        digits = bench.loader == "torchvision"
        given = [(f, Path(getattr(self, f)).expanduser()) for f in self.given((*TARGET_FLAGS, *EVAL_FLAGS))]
        for flag, path in given:  # their contents are checked when loaded
            kind = flag.rsplit("_", 1)[-1]
            if kind == "id" and str(getattr(self, flag)).startswith((".", "/", "~")) and not path.exists():
                raise DataNotFoundError(
                    f"--{flag} {path} does not exist (a local path; a Hub id has no leading . / ~)"
                )
            if kind != "id" and not (path.is_dir() if kind == "dir" else path.is_file()):
                what = f"is a {'file, not a folder' if kind == 'dir' else 'folder, not a file'}"
                takes = "a folder of images" if kind == "dir" else "a text file of image paths"
                raise DataNotFoundError(
                    f"--{flag} {path} {what if path.exists() else 'does not exist'}; it takes {takes}"
                )
        data_dir = Path(self.data_dir) if self.data_dir else None
        if data_dir is not None and not self.dataset_id and not self.download and not data_dir.is_dir():
            raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(bench)}")
        for key in sorted({k for task in tasks for k in task} & set(bench.domains)):
            for split in () if self.dataset_id or digits else sorted({"train", bench.eval_split}):
                if _find_list_file(bench, bench.domains[key], split, self) is None and data_dir is not None:
                    _domain_root(bench, bench.domains[key], data_dir)

    def check_target_flags(self, bench: BenchmarkConfig, targets: list[str], *, all_tasks: bool) -> None:
        """--target_*/--eval_* against --target (``targets``), --all and each other; --source_val_fraction's range."""
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
                alternatives = ", ".join(f"--{f}" for f in self.given(flags))
                raise ConfigError(f"give the {what} target once: {alternatives} are alternatives")
        if not 0.0 <= self.source_val_fraction < 1.0:
            raise ConfigError(f"--source_val_fraction must be in [0, 1), got {self.source_val_fraction}")


def _where_to_get(cfg: BenchmarkConfig) -> str:
    """Where to get a benchmark and the folder tree it expects under --data_dir, for error messages."""
    inner = "<image files>" if cfg.requires_image_lists else "<class name>/<image files>"
    tree = [f"  {spec.folder}/{inner}" for spec in cfg.domains.values()]
    if cfg.loader == "torchvision":
        tree = ["  MNIST/raw/*-ubyte, usps.bz2, usps.t.bz2, train_32x32.mat, test_32x32.mat (SVHN)"]
    if lists := sorted({name for spec in cfg.domains.values() for name in spec.list_files.values()}):
        needed = "required" if cfg.requires_image_lists else "optional, with --image_list_dir"
        tree.append(f"  {lists[0]}, ... ({needed}; in <data_dir>, <data_dir>/image_list or <data_dir>/list;")
        tree.append('   one "relative/path label" per line, paths relative to <data_dir>)')
    return (
        f"Get {cfg.display_name} from {cfg.homepage or 'its official page'} (licence: {cfg.license or 'see the page'})"
        f" and lay it out as:\n<data_dir>/\n" + "\n".join(tree) + "\nDetails: docs/datasets.md#"
        f"{cfg.display_name.lower().replace(' ', '-').replace('.', '')}"
    )


def files_dataset(images: Sequence[Any], labels: Sequence[int] | None = None, classes=None) -> Dataset:
    """Images (paths as str, or arrays) + labels named by ``classes``, in the recipes' schema; no file is opened."""
    data, features = {"image": list(images)}, {"image": Image(decode=False)}
    if labels is not None:
        data["label"], features["label"] = [int(y) for y in labels], ClassLabel(names=list(classes))
    return Dataset.from_dict(data, features=Features(features))


def image_paths(ds: Dataset) -> list[str | None]:
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


def image_folder(root: str | os.PathLike, labeled: bool = True, flag: str = "--target_dir") -> Dataset:
    """An ImageFolder as a dataset. Labeled: ``root/<class>/**/<images>``, every class folder holding images.
    Unlabeled (``flag``): the images directly in ``root``; sub-folders with images mean a labeled set."""
    root = Path(root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if labeled and not classes:
        raise DataNotFoundError(f"{root} has no class sub-folders; expected {root}/<class name>/<image files>")
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
            f"{flag} {root} holds {len(nested)} sub-folders with images ({', '.join(f'{d}/' for d in nested[:5])}). "
            "That is the layout of a labeled ImageFolder (one folder per class): pass it as --eval_dir to adapt on "
            f"its images and report accuracy with its labels. {flag} takes a flat folder of unlabeled images."
        )
    if not (images := _images_under(root, recursive=False)):
        raise DataNotFoundError(f"{flag} {root} holds no images; point it at the folder with the image files")
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


def read_image_list(list_file: str | os.PathLike, root=None, classes=None, labeled: bool = True) -> Dataset:
    """A "relative/path label" list as a labeled dataset, or (``labeled=False``, --target_list) a list of paths.
    Paths are relative to ``root`` (default: the list's folder). Class names: ``classes``, else each label's parent
    folder name, which must be one per label."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    text = read_list_text(list_file)
    lines = [(n, s) for n, line in enumerate(text.splitlines(), 1) if (s := line.strip()) and not s.startswith("#")]
    rows = []
    for n, line in lines if labeled else ():
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{n}: expected 'relative/path label' (integer label), got {line!r}")
        if int(parts[1]) < 0:
            raise DataError(f"{list_file}:{n}: negative label {int(parts[1])}")
        rows.append((parts[0], int(parts[1])))
    if looks := [(n, line) for n, line in lines if not labeled and _labeled_line(root, line)]:
        raise DataError(
            f"--target_list {list_file}: {len(looks)} of {len(lines)} lines look like 'path label' (line "
            f"{looks[0][0]}: {looks[0][1]!r}). That is a labeled image list: pass it as --eval_list to adapt on its "
            "images and report accuracy with its labels. --target_list takes one image path per line."
        )
    if not lines:
        raise DataError(f"{'' if labeled else '--target_list '}{list_file} lists no images")
    paths = [str(root / rel) for rel, _ in rows] if labeled else [str(root / line) for _, line in lines]
    if missing := [p for p in paths if not Path(p).is_file()]:
        hint = "relative to --data_dir; check that --data_dir points at the folder the list was written for"
        raise DataNotFoundError(
            f"{len(missing)} of {len(paths)} images listed in {list_file} do not exist under {root}, e.g. "
            f"{', '.join(missing[:5])}. Paths in a list are {hint if labeled else 'relative to the list folder'}"
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
                f"cannot name the classes of {list_file} from its paths ({detail}); add 'classes:' (names in label "
                "order) to the benchmark YAML"
            )
        classes = [next(iter(names[y])) for y in range(n_labels)]
    return files_dataset(paths, [y for _, y in rows], classes)


def _labeled_line(root: Path, line: str) -> bool:
    """A "path label" line in a list of paths: the line is no file, but the path before the number is."""
    head, _, tail = line.rpartition(" ")
    return not (root / line).is_file() and bool(head) and tail.lstrip("-").isdigit() and (root / head).is_file()


def load_hf_dataset(dataset_id: str, split: str, flag: str, name: str | None = None) -> Dataset:
    """``load_dataset`` (Hub id or local files) or ``load_from_disk`` (a ``save_to_disk`` folder); errors name
    ``flag`` and the fix."""
    if (Path(dataset_id) / "state.json").is_file() or (Path(dataset_id) / "dataset_dict.json").is_file():
        ds = datasets.load_from_disk(dataset_id)
        if isinstance(ds, datasets.DatasetDict) and split not in ds:
            raise DataError(f"{flag} {dataset_id!r} has splits {list(ds)}, not {split!r}: pass the split flag")
        return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
    try:
        return datasets.load_dataset(dataset_id, name=name, split=split)
    except ConnectionError as exc:
        raise DataNotFoundError(
            f"{flag}: could not reach the Hub for dataset {dataset_id!r} ({exc}). If you are offline, download it "
            "once with network access (it is then cached) and set HF_HUB_OFFLINE=1, or use a local path (or "
            "--data_dir with the files)"
        ) from exc
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise DataNotFoundError(
            f"{flag}: no dataset {dataset_id!r} on the Hub or on disk (private or gated: log "
            f"in with `hf auth login`): {exc}"
        ) from exc
    except ValueError as exc:  # unknown config or split
        extra = " If one config holds all domains, pass --domain_column naming them." if name else ""
        raise DataError(f"{flag}: cannot load split {split!r} of {dataset_id!r}: {exc}{extra}") from exc


def _in_schema(ds: Dataset, flag: str, labeled: bool, classes: Sequence[str] | None = None) -> Dataset:
    """A loaded dataset as ``image`` (+ ``label``): labeled needs a label column, unlabeled refuses one."""
    image = next((k for k, f in ds.features.items() if isinstance(f, Image)), None)
    label = next((k for k, f in ds.features.items() if isinstance(f, ClassLabel)), None)
    label = label or next((k for k in ("label", "labels") if k in ds.features), None)
    if image is None or (labeled and label is None):
        hint = " Without labels it is an unlabeled target: --target_dataset_id." if image else ""
        raise DataError(
            f"{flag} needs an Image column{' and a label column' * labeled}; has {list(ds.features)}.{hint}"
        )
    if not labeled and label is not None:
        raise DataError(
            f"{flag} has a label column {label!r}: a labeled dataset. Pass it as --eval_dataset_id to adapt on its "
            "images and report accuracy with its labels; --target_dataset_id takes images without labels."
        )
    if not labeled:
        return ds.select_columns([image]).rename_columns({image: "image"}).cast_column("image", Image(decode=False))
    if not (classes := getattr(ds.features[label], "names", None) or classes):
        raise DataError(f"{flag}: label column {label!r} is no ClassLabel; add 'classes:' to the benchmark YAML")
    ds = ds.select_columns([image, label]).rename_columns({image: "image", label: "label"})
    return ds.cast(Features({"image": Image(decode=False), "label": ClassLabel(names=list(classes))}))


def _domain_root(cfg: BenchmarkConfig, spec: DomainSpec, data_dir: Path) -> Path:
    tried = [data_dir / f for f in (spec.folder, *spec.alt_folders)]
    if found := next((p for p in tried if p.is_dir()), None):
        return found
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({spec.name}) not found: looked for "
        f"{' and '.join(str(p) for p in tried)}. {_where_to_get(cfg)}"
    )


def _find_list_file(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data: DataArguments) -> Path | None:
    """--image_list, else ``--image_list_dir/<list name>``, else the shipped list when the benchmark needs lists;
    None: read the domain's folder."""
    name, given = spec.list_files.get(split, ""), data.image_lists(cfg).get(spec.key)
    if data.image_list_dir and given is None:
        given = Path(data.image_list_dir) / name
        if not name or not given.is_file():
            raise DataNotFoundError(
                f"image list {given} for domain {spec.key} ({split}) not found in --image_list_dir"
            )
    if given is not None and not given.is_file():
        raise DataNotFoundError(f"image list {given} (domain {spec.key}) does not exist")
    if given is not None or not cfg.requires_image_lists:
        return given
    if data.data_dir is None:
        raise DataNotFoundError(f"{cfg.display_name} needs --data_dir (and its image lists). {_where_to_get(cfg)}")
    tried = [Path(data.data_dir) / sub / name for sub in LIST_SEARCH_SUBDIRS]
    if found := next((p for p in tried if p.is_file()), None):
        return found
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({split}) needs the image list {name}: looked in "
        f"{', '.join(str(p.parent) for p in tried)}. Pass --image_list_dir or --image_list {spec.key}=FILE. "
        f"{_where_to_get(cfg)}"
    )


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
            f"{_where_to_get(cfg)}"
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
        raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {_where_to_get(cfg)}")
    if data.dataset_id:
        config = (data.dataset_config or ("" if data.domain_column else "{domain}")).format(
            domain=spec.folder, key=spec.key, name=spec.name
        )
        ds = load_hf_dataset(data.dataset_id, split, "--dataset_id", config or None)
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
        ds = _in_schema(ds, f"--dataset_id {where}", True, cfg.classes)
    elif data_dir is None and cfg.loader == "torchvision":
        raise DataNotFoundError(f"digits need --data_dir (torchvision files live there). {_where_to_get(cfg)}")
    elif cfg.loader == "torchvision":
        ds, where = _load_digits(cfg, spec, split, data), f"{spec.name} under {data_dir}"
    elif (list_file := _find_list_file(cfg, spec, split, data)) is not None:
        ds, where = read_image_list(list_file, data_dir, cfg.classes), f"image list {list_file}"
    elif data_dir is None:
        raise DataNotFoundError(f"no data source for domain {spec.key}: pass --data_dir. {_where_to_get(cfg)}")
    else:
        ds, where = image_folder(_domain_root(cfg, spec, data_dir)), str(_domain_root(cfg, spec, data_dir))
    if len(classes_of(ds)) != cfg.num_classes:
        raise ClassMismatchError(
            f"{where} has {len(classes_of(ds))} classes but {cfg.display_name} has {cfg.num_classes}: is this the "
            f"right folder, and is the download complete? {_where_to_get(cfg)}"
        )
    verify_images(ds, data.verify_images, spec.key)
    return ds


def verify_images(ds: Dataset, mode: str = "header", domain: str = "") -> int:
    """Open every image file up front (``header``: PIL open; ``full``: decode); one CorruptImageError lists all."""

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
            f"{len(bad)} of {len(paths)} images of domain {domain!r} cannot be read:\n  {listing}\nRe-download / "
            "re-extract them, or delete them (and their image-list lines)"
        )
    return len(paths)


def load_target(data: DataArguments, classes: Sequence[str] | None = None) -> Dataset:
    """The target of --target_* (no labels; ``classes`` None) or --eval_* (labeled, reporting only: its classes must
    be ``classes``, the source's, in the same order)."""
    kind = "eval" if classes is not None else "target"
    folder, listed, dataset_id = (getattr(data, f"{kind}_{s}") for s in ("dir", "list", "dataset_id"))
    if (folder and not Path(folder).is_dir()) or (listed and not Path(listed).is_file()):
        raise DataNotFoundError(f"--{kind}_{'dir' if folder else 'list'} {folder or listed} does not exist")
    if folder and classes is not None and not any(e.is_dir() for e in os.scandir(folder)):
        raise DataError(
            f"--eval_dir {folder} holds no class sub-folders, so it has no labels: pass it as --target_dir (unlabeled "
            "target). --eval_dir takes <dir>/<class name>/<images>."
        )
    if folder:
        ds = image_folder(folder, labeled=classes is not None)
    elif listed:
        try:
            ds = read_image_list(listed, None, classes, labeled=classes is not None)
        except DataError as exc:
            hint = ". An image list without labels is an unlabeled target: --target_list" if classes else ""
            raise type(exc)(f"{exc}{hint}") from exc
    else:
        ds = load_hf_dataset(dataset_id, getattr(data, f"{kind}_split"), f"--{kind}_dataset_id")
        ds = _in_schema(ds, f"--{kind}_dataset_id {dataset_id!r}", classes is not None, classes)
    if classes is not None:
        check_same_classes(list(classes), ds, ("the source", "the labeled target"))
    return ds


def split_source(source: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """(training part, held-out part): a stratified, seeded ``fraction`` of the source that never enters training."""
    if fraction <= 0:
        return source, None
    try:
        parts = source.train_test_split(test_size=fraction, stratify_by_column="label", seed=seed)
    except ValueError as exc:  # too few images per class
        raise DataError(f"--source_val_fraction {fraction}: {exc}; raise the fraction") from exc
    if len(parts["test"]) < 4:
        raise DataError(
            f"--source_val_fraction {fraction} holds out {len(parts['test'])} source images; the source "
            "validators need at least 4: raise the fraction"
        )
    return parts["train"], parts["test"]


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


def partial_target_classes(classes: Sequence[str], num_classes: int) -> list[int]:
    """Label indices of the first ``num_classes`` class names in alphabetical order (partial-set protocol)."""
    if not 0 < num_classes <= len(classes):
        raise ValueError(f"cannot keep {num_classes} of {len(classes)} classes")
    return [i for i, c in enumerate(classes) if c in sorted(classes)[:num_classes]]


def filter_classes(ds: Dataset, keep: Sequence[int]) -> Dataset:
    """The rows whose label is in ``keep``; the ``ClassLabel`` (so the label indices) stays the full set."""
    return ds.select([i for i, y in enumerate(labels_of(ds)) if y in set(keep)])


def partial_target(ds: Dataset, bench: BenchmarkConfig) -> Dataset:
    """The benchmark's partial-set target (Office-Home: the first 25 classes alphabetically)."""
    if not bench.partial.available:
        raise ConfigError(f"{bench.display_name} has no partial-set protocol")
    return filter_classes(ds, partial_target_classes(classes_of(ds), bench.partial.num_target_classes))


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
            "delete the file (and its image-list line), or run with --verify_images header to list every unreadable "
            "file up front"
        ) from exc


def transformed(ds: Dataset, transform: Callable, strong: Callable | None = None) -> Dataset:
    """``cmkd.data.with_image_transform`` after `open_rgb`: items ``{"pixel_values", "labels"?,
    "pixel_values_strong"?}``."""
    decoded = [Compose([open_rgb, t]) if t is not None else None for t in (transform, strong)]
    return with_image_transform(ds, *decoded)


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
    return TaskData(
        source=transformed(src, bench_transform(bench, aug.train_preset(source, "source"), **size)),
        target=transformed(
            tgt.select_columns(["image"]),  # adaptation never sees target labels
            bench_transform(bench, aug.train_preset(target, "target"), **size),
            bench_transform(bench, aug.strong, **size) if fixmatch else None,
        ),
        eval=transformed(tgt_eval, bench_transform(bench, aug.test, **size)),
        classes=classes_of(src),
        source_val=transformed(src_val, bench_transform(bench, aug.test, **size)) if src_val is not None else None,
    )
