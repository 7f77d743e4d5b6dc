"""The recipes' data flags (``DataArguments``, parsed by ``HfArgumentParser``) and the checks that say which fits.

``check`` refuses impossible combinations when the arguments are parsed; ``check_files`` then makes sure every
folder and file the flags name exists, without opening an image, before a model is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cmkd.benchmarks import BenchmarkConfig, ConfigError, DomainSpec
from cmkd.image_sets import DataNotFoundError

TARGET_FLAGS = ("target_dir", "target_list", "target_dataset_id")
EVAL_FLAGS = ("eval_dir", "eval_list", "eval_dataset_id")
LIST_SEARCH_SUBDIRS = ("", "image_list", "list")  # where shipped image lists live relative to --data_dir


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
        if not self.given((*TARGET_FLAGS, *EVAL_FLAGS)) and (
            unknown := sorted({k for task in tasks for k in task} - set(bench.domains))
        ):
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
            raise DataNotFoundError(f"--data_dir {data_dir} does not exist. {where_to_get(bench)}")
        for key in sorted({k for task in tasks for k in task} & set(bench.domains)):
            for split in () if self.dataset_id or digits else sorted({"train", bench.eval_split}):
                if find_list_file(bench, bench.domains[key], split, self) is None and data_dir is not None:
                    domain_root(bench, bench.domains[key], data_dir)

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


def where_to_get(cfg: BenchmarkConfig) -> str:
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


def domain_root(cfg: BenchmarkConfig, spec: DomainSpec, data_dir: Path) -> Path:
    tried = [data_dir / f for f in (spec.folder, *spec.alt_folders)]
    if found := next((p for p in tried if p.is_dir()), None):
        return found
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({spec.name}) not found: looked for "
        f"{' and '.join(str(p) for p in tried)}. {where_to_get(cfg)}"
    )


def find_list_file(cfg: BenchmarkConfig, spec: DomainSpec, split: str, data: DataArguments) -> Path | None:
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
        raise DataNotFoundError(f"{cfg.display_name} needs --data_dir (and its image lists). {where_to_get(cfg)}")
    tried = [Path(data.data_dir) / sub / name for sub in LIST_SEARCH_SUBDIRS]
    if found := next((p for p in tried if p.is_file()), None):
        return found
    raise DataNotFoundError(
        f"{cfg.display_name} domain {spec.key} ({split}) needs the image list {name}: looked in "
        f"{', '.join(str(p.parent) for p in tried)}. Pass --image_list_dir or --image_list {spec.key}=FILE. "
        f"{where_to_get(cfg)}"
    )
