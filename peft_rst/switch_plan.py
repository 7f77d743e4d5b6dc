"""Switching the active inference adapter of a whole model in a few tensor ops: a plan kept between switches.

Why: a switch used to be, per changed parameter, a scatter of w0 back, a gather of the values about to be replaced
and a scatter of the new ones, plus Python per layer and per parameter. With ~160 changed tensors that is ~500 small
ops whose dispatch costs as much as the memory traffic. The plan lays the base parameters the inference adapters
patch out back to back in one flat CPU buffer per dtype (same values, same `nn.Parameter` objects, each keeping a
storage of its own, as `reset_plan` does for W), and keeps for every loaded adapter its positions in that buffer,
its values and the w0 values at those positions (gathered the first time it is activated, while the base holds w0
there). A switch is then one scatter of the old adapter's w0 values and one scatter of the new adapter's values per
dtype, and a few plain attribute writes per layer so that each layer's own bookkeeping (`_patched`,
`_patch_backup`) describes the patch exactly as `RSTLayer.sync_patch` would have made it.

Before every switch the plan checks that every base parameter is still the same tensor at the same storage and
version (`load_state_dict`, `.to()` and in-place edits change one of them), and that no adapter's entries changed
since they were compiled; otherwise it recompiles (entries) or is rebuilt (tensors). Writes through `.data` that
bypass the version counter are not seen, as for the base fingerprint cache.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from . import layer as rst_layer
from .reset_plan import _contiguous_storages

# Entries per scatter: below torch's parallel grain size (32768), so each scatter runs on the calling thread. One
# scatter of 100k entries is split across the intra-op threads, and on a loaded machine waiting for the busy core
# costs far more than the scatter.
_SCATTER = 1 << 14


def _movable(base: torch.Tensor) -> bool:
    """A plain contiguous CPU float tensor that owns its whole storage, not in shared memory."""
    if isinstance(base, DTensor) or base.device.type != "cpu" or not base.dtype.is_floating_point:
        return False
    if not base.is_contiguous() or base.numel() == 0 or base.is_shared():
        return False
    return base.storage_offset() == 0 and base.untyped_storage().nbytes() == base.numel() * base.element_size()


class _Compiled:
    """One adapter's entries in the flat buffers: per dtype (positions, values, w0 values), per layer its backup."""

    def __init__(self) -> None:
        self.writes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # flat, pos, new, w0
        self.backups: dict[int, list] = {}  # layer index -> the `_patch_backup` the layer holds while patched
        self.nbytes = 0  # memory this adds to the layers' own entries (see `SwitchPlan.nbytes`)


class SwitchPlan:
    """The base parameters of `layers` in flat buffers, and every loaded inference adapter compiled against them."""

    def __init__(self, layers: list, previous: SwitchPlan | None = None) -> None:
        self.layers = layers
        self.current: str | None = None  # the adapter whose entries the plan wrote and the layers still hold
        self._compiled: dict[str, _Compiled] = {}
        self._uncompiled = True  # loaded adapters may lack their compiled entries
        self._generation = rst_layer.sparse_generation()
        # per layer: {parameter name: (dtype, offset in its flat buffer)}
        self._where: list[dict[str, tuple[torch.dtype, int]]] = [{} for _ in layers]
        self.flat: dict[torch.dtype, torch.Tensor] = {}
        groups: dict[torch.dtype, list[tuple[int, str, torch.Tensor]]] = {}
        seen: set[int] = set()
        for i, layer in enumerate(layers):
            for name, base in layer._modules["base_layer"]._parameters.items():
                if base is None or id(base) in seen:  # a tied parameter is held (and patched) by one layer only
                    continue
                seen.add(id(base))
                if _movable(base):
                    groups.setdefault(base.dtype, []).append((i, name, base))
        with torch.no_grad():
            for dtype, group in groups.items():
                flat = _laid_out(group, previous.flat.get(dtype) if previous is not None else None)
                if flat is None:  # move them (once: a later plan over the same tensors finds them in place)
                    flat, pieces = _contiguous_storages([b.numel() for _, _, b in group], dtype)
                    for (_, _, base), piece in zip(group, pieces, strict=True):
                        piece.copy_(base.detach().reshape(-1))
                        base.data = piece.view(base.shape)
                offset = 0
                for i, name, base in group:
                    self._where[i][name] = (dtype, offset)
                    offset += base.numel()
                self.flat[dtype] = flat
        self.checks = self._checks()

    def _checks(self) -> list[tuple[dict, str, torch.Tensor, int, int]]:
        return [
            (layer._modules["base_layer"]._parameters, name, base, base.data_ptr(), base._version)
            for layer in self.layers
            for name, base in layer._modules["base_layer"]._parameters.items()
            if base is not None
        ]

    @classmethod
    def build(cls, layers: list, previous: SwitchPlan | None = None) -> SwitchPlan | None:
        """A plan for `layers` (reusing `previous`'s buffers where the tensors are still laid out in them), or None
        if the layers nest wrappers (w0 lives further down: switches go layer by layer)."""
        for layer in layers:
            if isinstance(layer._modules["base_layer"], rst_layer.BaseTunerLayer):
                return None
        return cls(layers, previous)

    def valid(self, layers: list) -> bool:
        """Whether the model still holds the tensors this plan laid out (else: rebuild).

        A tensor written in place since (its version moved: `load_state_dict`, a merge) keeps the layout but makes
        the gathered w0 values stale: they are dropped, and the current patch is then taken out layer by layer.
        """
        if layers is not self.layers:
            return False
        stale = False
        for owner, name, tensor, ptr, version in self.checks:
            current = owner.get(name)
            if current is not tensor or current.data_ptr() != ptr:
                return False
            stale = stale or current._version != version
        if stale:
            self._compiled.clear()
            self._uncompiled = True
            self.current = None
            self.checks = self._checks()
        return True

    def _compile_all(self) -> None:
        """Compile every loaded adapter (after a load, the first switch pays for all of them, not each first use)."""
        names = dict.fromkeys(a for layer in self.layers for a in layer._modules["rst_sparse"].keys())
        for adapter in names:
            if adapter not in self._compiled and any(
                layer._modules["rst_sparse"].is_loaded(adapter) for layer in self.layers
            ):
                compiled = self._compile(adapter)
                if compiled is not None:
                    self._compiled[adapter] = compiled
        self._uncompiled = False

    def _compile(self, adapter: str) -> _Compiled | None:
        """`adapter`'s entries as positions in the flat buffers (base must hold w0 at them); None if not coverable."""
        parts: dict[torch.dtype, tuple[list, list]] = {}
        compiled = _Compiled()
        spans: list[tuple[int, str, torch.dtype, int, int]] = []  # layer, parameter, dtype, start, count
        counts = dict.fromkeys(self.flat, 0)
        for i, layer in enumerate(self.layers):
            sparse = layer._modules["rst_sparse"]
            if not sparse.is_loaded(adapter):
                continue
            compiled.backups[i] = []
            for name, positions, values in sparse.updates(adapter):
                where = self._where[i].get(name)
                if where is None or positions.device.type != "cpu":
                    return None
                dtype, offset = where
                pos, vals = parts.setdefault(dtype, ([], []))
                pos.append(positions.to(torch.int64) + offset)
                vals.append(values.to(dtype))
                spans.append((i, name, dtype, counts[dtype], positions.numel()))
                counts[dtype] += positions.numel()
        w0s: dict[torch.dtype, torch.Tensor] = {}
        all_values: dict[torch.dtype, torch.Tensor] = {}
        for dtype, (pos, vals) in parts.items():
            flat = self.flat[dtype]
            positions = torch.cat(pos)
            if flat.numel() < 2**31 and rst_layer.overwrite._INT32_OK:
                positions = positions.to(torch.int32)  # half the memory; scatter_ takes it as it is
            w0 = flat.index_select(0, positions)
            w0s[dtype] = w0
            values = all_values[dtype] = torch.cat(vals)
            compiled.nbytes += sum(t.numel() * t.element_size() for t in (positions, w0, values))
            for start in range(0, positions.numel(), _SCATTER):
                end = start + _SCATTER
                compiled.writes.append((flat, positions[start:end], values[start:end], w0[start:end]))
        for i, name, dtype, start, count in spans:
            sparse = self.layers[i]._modules["rst_sparse"]
            entry = sparse[adapter][name]
            compiled.backups[i].append((name, entry.indices, w0s[dtype][start : start + count]))
            if entry.values.dtype == dtype:  # the layer keeps a view of the plan's copy: one memory, not two
                sparse.share_values(adapter, name, all_values[dtype][start : start + count])
                compiled.nbytes -= count * entry.values.element_size()
        return compiled

    def nbytes(self, adapter: str) -> int:
        """Bytes this plan adds for `adapter` once compiled: per changed entry its position in the flat buffer
        (int32, or int64 in buffers of 2**31 entries or more) and the w0 it replaces. Its values are one copy
        that the layers' entries hold views of (unless they are of another dtype than the base)."""
        compiled = self._compiled.get(adapter)
        return 0 if compiled is None else compiled.nbytes

    def switch(self, adapter_names: list[str]) -> bool:
        """Make every layer hold w0 patched by the one loaded inference adapter in `adapter_names`, if any.

        Returns False, changing nothing, when the switch needs the layer-by-layer path: a layer holds trainable
        adapters, is merged or disabled, or several adapters are asked for while one of them is an inference one.
        """
        layers = self.layers
        for layer in layers:
            state = layer.__dict__
            if layer._modules["rst_weight"]._modules or state["merged_adapters"] or state["_disable_adapters"]:
                return False
            if layer.frozen_peft_weight_names:
                return False
        wanted = None
        loaded = [a for a in adapter_names if any(layer._modules["rst_sparse"].is_loaded(a) for layer in layers)]
        if loaded:
            if len(adapter_names) > 1:
                return False  # RSTLayer raises its own error for this
            wanted = loaded[0]
        if self._generation != rst_layer.sparse_generation():
            self._compiled.clear()
            self._generation = rst_layer.sparse_generation()
            self._uncompiled = True
        # take the current patch out: in one scatter per dtype if the layers still hold what this plan wrote
        old = self._compiled.get(self.current) if self.current is not None else None
        if old is not None and self._holds(old, self.current):
            for flat, positions, _, w0 in old.writes:
                flat.scatter_(0, positions, w0)  # the layers' bookkeeping is rewritten below
        else:
            for layer in layers:
                layer.restore_base_weights()
        self.current = None
        if self._uncompiled:  # the base holds w0 everywhere now: gather it for every loaded adapter at once
            self._compile_all()
        new = None
        if wanted is not None:
            new = self._compiled.get(wanted)
            if new is None:  # an entry outside the flat buffers: layer by layer, from w0
                for layer in layers:
                    layer.__dict__["_patched"] = None
                    layer.__dict__["_patch_backup"] = []
                    layer.set_adapter(adapter_names)
                return True
            for flat, positions, values, _ in new.writes:
                flat.scatter_(0, positions, values)
            self.current = wanted
        backups = new.backups if new is not None else {}
        for i, layer in enumerate(layers):
            state = layer.__dict__
            state["_active_adapter"] = list(adapter_names)
            state["_dense_active"] = False
            backup = backups.get(i)
            if backup is None:
                state["_patched"] = None
                state["_patch_backup"] = []
            else:
                state["_patched"] = wanted
                state["_patch_backup"] = backup
        return True

    def _holds(self, compiled: _Compiled, adapter: str) -> bool:
        """Whether every layer's bookkeeping is still exactly what writing `compiled` left (nothing re-patched)."""
        backups = compiled.backups
        for i, layer in enumerate(self.layers):
            state = layer.__dict__
            backup = backups.get(i)
            if backup is None:
                if state["_patched"] is not None:
                    return False
            elif state["_patch_backup"] is not backup or state["_patched"] != adapter:
                return False
        return True


def _laid_out(group: list[tuple[int, str, torch.Tensor]], flat: torch.Tensor | None) -> torch.Tensor | None:
    """`flat` if the tensors of `group` are its pieces, in order and filling it; else None."""
    if flat is None or flat.numel() != sum(b.numel() for _, _, b in group):
        return None
    ptr, size = flat.data_ptr(), flat.element_size()
    for _, _, base in group:
        if base.data_ptr() != ptr:
            return None
        ptr += base.numel() * size
    return flat
