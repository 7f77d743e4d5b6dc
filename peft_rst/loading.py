"""Transactions for loading adapters: a refused load leaves the model exactly as it was.

peft mutates the model in several steps when it loads an adapter (inject the layers, freeze the base, wrap
`modules_to_save`, read the file, map keys, copy tensors), and an error in any step used to leave a half-loaded model.
RST therefore validates the file against the model before peft copies anything (`RSTModel`), and takes a
`ModelSnapshot` before the first mutation, which puts back the module tree, every module's attributes and containers,
the `requires_grad` flags, the inference patches written into the base weights and the registered reset hooks.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from . import format as rst_format
from . import reset

_CONTAINERS = (dict, OrderedDict, list, set)


def _copy(container):
    return list(container) if isinstance(container, list) else type(container)(container)


def _put_back(container, saved) -> None:
    """Give `container` its saved contents in place, so that objects sharing it (peft aliases dicts) still do."""
    if isinstance(container, list):
        container[:] = saved
    else:
        container.clear()
        container.update(saved)


class ModelSnapshot:
    """The restorable state of every module below `roots` (no tensor copies: data changes are handled explicitly).

    Loading adds modules, attributes and adapter entries, replaces children, flips `requires_grad`, and takes
    inference patches out of the base weights; it never writes into existing trained tensors before all checks
    have passed. Restoring puts back each module's `__dict__` (children, parameters, hooks, adapter bookkeeping),
    the contents of its containers in place, the `requires_grad` flags, and re-applies inference patches bit-exactly.
    """

    def __init__(self, *roots: nn.Module) -> None:
        from .layer import RSTLayer

        self._roots = roots
        self._modules: list[tuple[nn.Module, dict]] = []
        self._containers: dict[int, tuple[object, object]] = {}
        self._flags = []
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():  # one walk: this runs on every load
                if id(module) in seen:
                    continue
                seen.add(id(module))
                state = dict(module.__dict__)
                self._modules.append((module, state))
                for value in state.values():
                    if type(value) in _CONTAINERS and id(value) not in self._containers:
                        self._containers[id(value)] = (value, _copy(value) if value else None)
                self._flags += [(p, p.requires_grad) for p in module._parameters.values() if p is not None]
        self._layers = [m for m, _ in self._modules if isinstance(m, RSTLayer)]
        self._groups = {
            id(m): set(m._reset_groups.values())
            for m, _ in self._modules
            if isinstance(getattr(m, "_reset_groups", None), dict)
        }

    def forget(self, container: dict, key) -> None:
        """Restore `container` (captured) without `key`: e.g. the config peft registered just before the snapshot."""
        saved = self._containers.get(id(container))
        if saved is not None and saved[1] is not None:
            saved[1].pop(key, None)

    def restore(self) -> None:
        from .layer import RSTLayer

        # take every inference patch out with the current bookkeeping: the base weights then hold w0 again
        current = {id(m): m for root in self._roots for m in root.modules() if isinstance(m, RSTLayer)}
        current.update({id(m): m for m in self._layers})
        for layer in current.values():
            layer.restore_base_weights()
        tuners = [m for m, _ in self._modules if id(m) in self._groups]
        added = {g for t in tuners for g in getattr(t, "_reset_groups", {}).values()}
        for module, state in self._modules:
            module.__dict__.clear()
            module.__dict__.update(state)
        for container, saved in self._containers.values():
            if saved is None:
                container.clear()
            else:
                _put_back(container, saved)
        for parameter, flag in self._flags:
            parameter.requires_grad_(flag)
        for layer in self._layers:  # the saved bookkeeping describes a patch the base no longer holds: redo it
            layer._patched = None
            layer._patch_backup = []
            if len(layer.rst_sparse):
                layer.sync_patch()
        kept = set().union(*self._groups.values()) if self._groups else set()
        for group in added - kept:
            reset.unregister(group)
        for group in kept:
            reset.register(group)


@dataclass(frozen=True)
class LoadCall:
    """The `PeftModel.from_pretrained` / `load_adapter` call an injection belongs to."""

    frame_id: int
    model_id: object
    subfolder: str | None
    adapter_name: object

    @property
    def local_folder(self) -> str | None:
        """The adapter folder on disk, if the call reads one (None for a Hub id)."""
        if not isinstance(self.model_id, (str, os.PathLike)):
            return None
        folder = os.path.join(os.fspath(self.model_id), self.subfolder or "")
        return folder if os.path.isdir(folder) else None

    def is_active(self) -> bool:
        """Whether the call is still running (it is on the stack)."""
        codes = _load_codes()
        return any(id(f) == self.frame_id and f.f_code in codes for f in _frames())


def _frames():
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _load_codes() -> set:
    from peft import PeftModel

    return {PeftModel.from_pretrained.__func__.__code__, PeftModel.load_adapter.__code__}


def _current_call() -> LoadCall | None:
    """The innermost peft load call on the stack (peft's public parameter names `model_id`, `adapter_name`)."""
    codes = _load_codes()
    for frame in _frames():
        if frame.f_code in codes:
            local = frame.f_locals
            kwargs = local.get("kwargs") or {}
            subfolder = kwargs.get("subfolder") if isinstance(kwargs, dict) else None
            return LoadCall(id(frame), local.get("model_id"), subfolder, local.get("adapter_name"))
    return None


def current_load_call() -> LoadCall | None:
    """The `PeftModel.from_pretrained` / `load_adapter` call running now, if any.

    peft gives the tuner no handle on the file being loaded when it injects the layers; the call's own arguments
    are the only place it exists, and knowing it lets RST check the file before the model is changed.
    """
    return _current_call()


class HandedFile:
    """An adapter file that a loader read itself and hands to peft under other keys.

    transformers' route (`transformers_integration.load_rst_adapter`) reads the file and drops peft's
    `base_model.model.` prefix from every key, because a transformers model's module names lack it. The file's
    `rst_integrity` record names the tensors as written, so the tuner hook maps the keys it is given back to the
    file's own keys (`as_in_file`) and checks the file as it is on disk, not as it was renamed.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], rename: Callable[[str], str], source: str) -> None:
        self._tensors = tensors
        self._origin: dict[str, str] = {}  # handed key -> key in the file
        for key in tensors:
            handed = rename(key)
            if handed in self._origin:
                raise rst_format.RSTFormatError(
                    f"{source}: the adapter file holds both '{self._origin[handed]}' and '{key}', which load into the "
                    f"same parameter '{handed}'; {rst_format._REDO}."
                )
            self._origin[handed] = key
        self.handed = {handed: tensors[key] for handed, key in self._origin.items()}

    def file_keys(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state` (handed keys) under the file's keys; a key stays as given unless its tensor is the file's own."""
        out = {}
        for key, tensor in state.items():
            origin = self._origin.get(key)
            out[origin if origin is not None and self._tensors[origin] is tensor else key] = tensor
        return out

    @contextlib.contextmanager
    def handing_on(self) -> Iterator[None]:
        """While active, `as_in_file` maps the handed keys back to this file's keys."""
        token = _HANDED.set(self)
        try:
            yield
        finally:
            _HANDED.reset(token)


_HANDED: contextvars.ContextVar[HandedFile | None] = contextvars.ContextVar("peft_rst_handed_file", default=None)


def as_in_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state` under the keys of the adapter file it was read from (unchanged unless a `HandedFile` is active)."""
    handed = _HANDED.get()
    return state if handed is None else handed.file_keys(state)
