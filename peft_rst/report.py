"""Downstream Parameters (DSP) and storage of RST adapters, from a saved folder or a live `PeftModel`.

DSP is the paper's storage metric (Sec. IV.A): the entries a task has to store, i.e. the backbone entries RST changed
(``w != w0``) plus every parameter of the task head (`modules_to_save`), counted whole; summed over the tasks of a
benchmark it is the DSP(M) column of the paper's tables. Both sources go through the same path: the tensors that
`save_pretrained` writes (read from the file, or produced by peft's `get_peft_model_state_dict`), so the report
counts exactly what is stored, and a saved folder is measured without loading its base model.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import format as rst_format
from .config import read_config_file

__all__ = ["ADAPTER_FILES", "AdapterReport", "DSPReport", "ModuleRow", "report", "report_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)  # what loading an adapter needs: its size on disk
_PEFT_PREFIX = "base_model.model."
_CONTAINER = ".rst_weight"

RST, HEAD, DENSE = "rst", "head", "dense"


@dataclass(frozen=True)
class ModuleRow:
    """What one module of the adapted model stores.

    kind: "rst" (sparse changed entries of backbone parameters), "head" (a `modules_to_save` module, stored and
    counted whole) or "dense" (any other tensor in the checkpoint, also counted whole).
    """

    module: str
    kind: str
    parameters: tuple[str, ...]
    numel: int  # entries of the module's parameters
    changed: int  # entries the adapter stores: changed entries (rst) or all of them (head, dense)
    nbytes: int  # bytes of the module's tensors in adapter_model.safetensors (tensor data, no file header)

    @property
    def density(self) -> float:
        return self.changed / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "kind": self.kind,
            "parameters": list(self.parameters),
            "numel": self.numel,
            "changed": self.changed,
            "density": self.density,
            "nbytes": self.nbytes,
        }


@dataclass(frozen=True)
class AdapterReport:
    """DSP and storage of one adapter. `files` maps file name to size on disk (empty for a live model)."""

    name: str
    rows: tuple[ModuleRow, ...]
    tau: float | None = None
    base_model: str | None = None
    files: Mapping[str, int] = field(default_factory=dict)

    @property
    def backbone_numel(self) -> int:
        return sum(r.numel for r in self.rows if r.kind == RST)

    @property
    def backbone_changed(self) -> int:
        return sum(r.changed for r in self.rows if r.kind == RST)

    @property
    def head_params(self) -> int:
        return sum(r.changed for r in self.rows if r.kind != RST)

    @property
    def dsp(self) -> int:
        """Downstream parameters: changed backbone entries + all head parameters."""
        return self.backbone_changed + self.head_params

    @property
    def dsp_m(self) -> float:
        return self.dsp / 1e6

    @property
    def density(self) -> float:
        """Fraction of the targeted backbone entries the adapter changes (the paper's 0.1 % - 0.5 %)."""
        return self.backbone_changed / self.backbone_numel if self.backbone_numel else 0.0

    @property
    def tensor_nbytes(self) -> int:
        return sum(r.nbytes for r in self.rows)

    @property
    def disk_nbytes(self) -> int | None:
        """Bytes of the files needed to load the adapter (None for a live model that was not saved)."""
        return sum(self.files.values()) if self.files else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "tau": self.tau,
            "base_model": self.base_model,
            "backbone_numel": self.backbone_numel,
            "backbone_changed": self.backbone_changed,
            "head_params": self.head_params,
            "dsp": self.dsp,
            "dsp_m": self.dsp_m,
            "density": self.density,
            "tensor_nbytes": self.tensor_nbytes,
            "disk_nbytes": self.disk_nbytes,
            "files": dict(self.files),
            "modules": [r.to_dict() for r in self.rows],
        }

    def table(self) -> str:
        header = ("module", "kind", "params", "numel", "changed", "density", "bytes")
        body = [
            (
                r.module,
                r.kind,
                ",".join(r.parameters),
                f"{r.numel:,}",
                f"{r.changed:,}",
                _pct(r.density),
                f"{r.nbytes:,}",
            )
            for r in self.rows
        ]
        lines = [f"adapter: {self.name}  (tau={self.tau}, base_model={self.base_model})"]
        lines.append(_format_table(header, body, right=(3, 4, 5, 6)))
        lines.append(
            f"backbone: {self.backbone_changed:,} of {self.backbone_numel:,} entries changed ({_pct(self.density)}); "
            f"head: {self.head_params:,} parameters"
        )
        lines.append(f"DSP: {self.dsp:,} = {self.dsp_m:.4f} M")
        if self.files:
            sizes = " + ".join(f"{name} {size:,}" for name, size in self.files.items())
            lines.append(f"on disk: {self.disk_nbytes:,} bytes ({sizes})")
        else:
            lines.append(f"tensor data if saved: {self.tensor_nbytes:,} bytes (live model, not on disk)")
        return "\n".join(lines)


@dataclass(frozen=True)
class DSPReport:
    """Reports of one or several adapters (e.g. the tasks of a benchmark) and their sum, the paper's DSP(M)."""

    adapters: tuple[AdapterReport, ...]

    @property
    def dsp(self) -> int:
        return sum(a.dsp for a in self.adapters)

    @property
    def dsp_m(self) -> float:
        return self.dsp / 1e6

    @property
    def tensor_nbytes(self) -> int:
        return sum(a.tensor_nbytes for a in self.adapters)

    @property
    def disk_nbytes(self) -> int | None:
        sizes = [a.disk_nbytes for a in self.adapters]
        return None if any(s is None for s in sizes) else sum(sizes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapters": [a.to_dict() for a in self.adapters],
            "total": {
                "adapters": len(self.adapters),
                "backbone_changed": sum(a.backbone_changed for a in self.adapters),
                "head_params": sum(a.head_params for a in self.adapters),
                "dsp": self.dsp,
                "dsp_m": self.dsp_m,
                "tensor_nbytes": self.tensor_nbytes,
                "disk_nbytes": self.disk_nbytes,
            },
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary_table(self) -> str:
        header = ("adapter", "changed", "head", "density", "DSP(M)", "bytes")
        body = [
            (
                a.name,
                f"{a.backbone_changed:,}",
                f"{a.head_params:,}",
                _pct(a.density),
                f"{a.dsp_m:.4f}",
                _nbytes(a.disk_nbytes if a.files else a.tensor_nbytes),
            )
            for a in self.adapters
        ]
        total = self.disk_nbytes if self.disk_nbytes is not None else self.tensor_nbytes
        body.append(
            (
                f"sum ({len(self.adapters)} adapters)",
                f"{sum(a.backbone_changed for a in self.adapters):,}",
                f"{sum(a.head_params for a in self.adapters):,}",
                "",
                f"{self.dsp_m:.4f}",
                _nbytes(total),
            )
        )
        return _format_table(header, body, right=(1, 2, 3, 4, 5), rule_before_last=True)

    def table(self, modules: bool | None = None) -> str:
        """Per-module tables (default for a single adapter), then per-adapter totals with a sum row (several)."""
        if modules is None:
            modules = len(self.adapters) == 1
        parts = [a.table() for a in self.adapters] if modules else []
        if len(self.adapters) > 1 or not modules:
            parts.append(self.summary_table())
        return "\n\n".join(parts)

    def __str__(self) -> str:
        return self.table()


# ----------------------------------------------------------------------------------------------------------------
# public entry points


def report(sources: Any, *, adapter_name: str | None = None) -> DSPReport:
    """DSP report of one adapter or several (a list): saved folders (or their .safetensors file) or live PeftModels.

    `adapter_name` picks the adapter of live models (default: the active one).
    """
    if isinstance(sources, (str, os.PathLike)) or not isinstance(sources, Iterable):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("report() needs at least one adapter folder or PeftModel.")
    return DSPReport(tuple(report_adapter(s, adapter_name=adapter_name) for s in sources))


def report_adapter(source: Any, *, adapter_name: str | None = None) -> AdapterReport:
    """DSP report of one adapter: a saved folder (read without the base model) or a live PeftModel."""
    if isinstance(source, (str, os.PathLike)):
        return _report_folder(Path(source))
    from peft import PeftModel

    if isinstance(source, PeftModel):
        return _report_model(source, adapter_name)
    raise TypeError(
        f"Cannot report on a {type(source).__name__}: pass an adapter folder (saved with save_pretrained) or the "
        "PeftModel returned by get_peft_model / PeftModel.from_pretrained."
    )


# ----------------------------------------------------------------------------------------------------------------
# sources


def _report_folder(path: Path) -> AdapterReport:
    if path.is_file():
        if path.name not in ADAPTER_FILES:
            raise NotADirectoryError(
                f"'{path}' is a file; expected an adapter folder (the directory given to save_pretrained, holding "
                f"{' and '.join(ADAPTER_FILES)})."
            )
        folder = path.parent
    else:
        folder = path
    weights, config_path = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"No adapter folder at '{path}': pass the directory given to save_pretrained.")
    if not weights.is_file():
        hint = (
            " (a pickled adapter_model.bin: re-save with safe_serialization=True)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"'{folder}' has no {WEIGHTS_NAME}{hint}; pass a folder written by save_pretrained.")
    if not config_path.is_file():
        raise FileNotFoundError(f"'{folder}' has no {CONFIG_NAME}; an adapter folder holds both files.")
    config = _read_config(config_path)

    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # safetensors' own SafetensorError: empty, truncated or garbled file
        raise rst_format.RSTFormatError(
            f"'{weights}' cannot be read as safetensors ({type(err).__name__}: {err}): the file is empty, truncated "
            "or corrupted; re-save the adapter from the trained model, or re-download the file if it was copied."
        ) from err
    rst_format.check_integrity(tensors, f"'{weights}'")
    files = {name: os.path.getsize(folder / name) for name in ADAPTER_FILES}
    rows = _rows(tensors, config.get("modules_to_save"), str(weights))
    return AdapterReport(str(path), rows, config.get("tau"), config.get("base_model_name_or_path"), files)


def _read_config(path: Path) -> dict[str, Any]:
    config = read_config_file(path)  # JSON object, peft_type and RST field types, or an error naming the file
    peft_type = config.get("peft_type")
    if peft_type != "RST":
        raise ValueError(
            f"'{path}' describes a {peft_type} adapter, not an RST one; the DSP report reads RST adapters only."
        )
    return config


def _report_model(model, adapter_name: str | None) -> AdapterReport:
    from peft.utils import get_peft_model_state_dict

    from .layer import RSTLayer

    adapter_name = adapter_name or model.active_adapter
    if adapter_name not in model.peft_config:
        raise ValueError(f"The model has no adapter '{adapter_name}'; it has {sorted(model.peft_config)}.")
    config = model.peft_config[adapter_name]
    if str(getattr(config.peft_type, "value", config.peft_type)) != "RST":
        raise ValueError(f"Adapter '{adapter_name}' is a {config.peft_type} adapter, not an RST one.")
    merged = [n for n, m in model.named_modules() if isinstance(m, RSTLayer) and m.merged]
    if merged:
        raise ValueError(
            f"{len(merged)} RST layers are merged (e.g. '{merged[0]}'), so their base weights no longer hold w0 and "
            "changed entries cannot be counted. Call model.unmerge_adapter() first, or report on the saved folder."
        )
    # exactly the tensors save_pretrained would write; never ask the Hub about embedding layers
    state = get_peft_model_state_dict(model, adapter_name=adapter_name, save_embedding_layers=False)
    rows = _rows(state, config.modules_to_save, f"adapter '{adapter_name}'")
    return AdapterReport(adapter_name, rows, config.tau, config.base_model_name_or_path)


# ----------------------------------------------------------------------------------------------------------------
# counting


def _rows(tensors: Mapping[str, torch.Tensor], modules_to_save, source: str) -> tuple[ModuleRow, ...]:
    """Group checkpoint tensors into module rows: sparse RST parameters and dense tensors counted whole."""
    # every RST parameter has an `idx` part (header + positions); `val` is absent when nothing changed
    sparse = {key[: -len(".idx")] for key in tensors if key.endswith(".idx") and tensors[key].dtype == torch.uint8}
    # module -> kind, [parameter names], numel, changed, nbytes
    acc: dict[str, list] = {}

    def add(module: str, kind: str, param: str, numel: int, changed: int, nbytes: int) -> None:
        entry = acc.setdefault(module, [kind, [], 0, 0, 0])
        if entry[0] != kind:
            raise ValueError(f"{source}: module '{module}' holds both sparse RST entries and dense tensors.")
        entry[1].append(param)
        entry[2] += numel
        entry[3] += changed
        entry[4] += nbytes

    for stem in sorted(sparse):
        parts = {s: tensors[f"{stem}.{s}"] for s in rst_format.SUFFIXES if f"{stem}.{s}" in tensors}
        name = stem.removeprefix(_PEFT_PREFIX)
        numel = rst_format.read_header(parts["idx"], name).numel
        data = rst_format.decode_sparse(parts, numel, name)  # validates header, positions, values and checksum
        # nested RST layers sit inside their parent's base_layer: report the model's own module names
        module, _, param = re.sub(r"\.base_layer(?=\.)", "", name).rpartition(".")
        add(module.removesuffix(_CONTAINER), RST, param, numel, int(data.indices.numel()), _nbytes_of(parts.values()))
    grouped = {f"{stem}.{s}" for stem in sparse for s in rst_format.SUFFIXES}
    for key, tensor in tensors.items():
        if key in grouped or key.removeprefix(_PEFT_PREFIX) == rst_format.INTEGRITY_KEY:  # checksums, not parameters
            continue
        name = key.removeprefix(_PEFT_PREFIX)
        head = _head_module(name, modules_to_save)
        module = head or name.rpartition(".")[0]
        add(
            module,
            HEAD if head else DENSE,
            name[len(module) + 1 :],
            tensor.numel(),
            tensor.numel(),
            _nbytes_of([tensor]),
        )

    rows = [
        ModuleRow(m, kind, tuple(sorted(params)), numel, changed, nb)
        for m, (kind, params, numel, changed, nb) in acc.items()
    ]
    rows.sort(key=lambda r: (r.kind != RST, _natural(r.module)))
    return tuple(rows)


def _head_module(name: str, modules_to_save) -> str | None:
    """The `modules_to_save` module a checkpoint key belongs to (peft's rule: full name or dotted suffix)."""
    if not modules_to_save:
        return None
    parts = name.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix == m or prefix.endswith(f".{m}") for m in modules_to_save):
            return prefix
    return None


def _nbytes_of(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _natural(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


# ----------------------------------------------------------------------------------------------------------------
# formatting


def _pct(x: float) -> str:
    return f"{100 * x:.3f}%"


def _nbytes(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _format_table(header, rows, right=(), rule_before_last: bool = False) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def line(cells) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(header), rule]
    out += [line(r) for r in rows[:-1]] if rule_before_last and rows else [line(r) for r in rows]
    if rule_before_last and rows:
        out += [rule, line(rows[-1])]
    return "\n".join(out)
