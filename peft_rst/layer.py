"""The RST tuner layer: one wrapper for every kind of module that owns parameters.

Design (b) of docs/design: the base layer keeps w0 untouched and each adapter holds a trainable dense copy W of
every parameter the wrapped module owns directly (weight, bias, or bare `nn.Parameter`s such as CLIP's
`class_embedding`). The forward pass runs the base module with W swapped in (`torch.func.functional_call`), so one
class serves Linear, Conv, Embedding, norms, transformers' Conv1D and any custom module, and W is updated exactly as
the weight of a fully fine-tuned model would be, which is what makes the reset of Algorithm 1 bit-exact.
"""

from __future__ import annotations

import inspect
import sys
import warnings
from typing import Any, NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.modules.module import (
    _global_backward_hooks,
    _global_backward_pre_hooks,
    _global_forward_hooks,
    _global_forward_pre_hooks,
)

from . import format as rst_format
from . import overwrite
from .reset import ResetTarget, unregister


class SparseEntries(NamedTuple):
    """The changed entries of one parameter of one inference adapter, decoded once at load time."""

    indices: torch.Tensor  # flat positions, int32 where they fit (index_put_ takes them as they are)
    values: torch.Tensor  # the adapted values, bit for bit
    numel: int  # size of the parameter the positions index
    base_fingerprint: int  # of the w0 the adapter was trained from; written back unchanged on re-saving

    @classmethod
    def from_data(cls, data: rst_format.SparseTensorData, device: torch.device | None = None) -> SparseEntries:
        indices = data.indices.to(torch.int32) if data.numel < 2**31 else data.indices
        return cls(indices.to(device), data.values.to(device), data.numel, data.base_fingerprint)

    def parts(self) -> dict[str, torch.Tensor]:
        """The encoded form, as `save_pretrained` writes it."""
        return rst_format.encode_sparse(
            self.indices.long().cpu(), self.values.cpu(), self.numel, self.base_fingerprint
        )


# Bumped whenever any layer's inference-adapter entries change: tells a `SwitchPlan` its compiled entries are stale.
# Still 0 if no inference adapter was ever added in this process (copies and unpickled layers bump it too): then
# every layer's `rst_sparse` is empty, and the forward pass skips looking.
_generation = [0]


def sparse_generation() -> int:
    return _generation[0]


class SparseAdapters(nn.Module):
    """Every inference adapter of one layer: adapter name -> {parameter name: `SparseEntries`}.

    One module per layer however many adapters are loaded, so that the module walks of peft and torch
    (`set_adapter`, `load_adapter`, `load_state_dict`, `.eval()`) cost the same with 1 or 50 domains. Memory is ~8
    bytes per changed entry. The tensors stay out of `state_dict()` (saving goes through RST's sparse encoder,
    loading through `RSTModel`), and follow the module through `.to()` / `.half()` via `_apply`. An adapter is
    created empty by peft's injection and filled when its checkpoint is loaded.
    """

    def __init__(self) -> None:
        super().__init__()
        self._adapters: dict[str, dict[str, SparseEntries]] = {}
        # adapter name -> [(parameter, positions, values)] of the parameters it changes: what activating it writes
        self._updates: dict[str, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}

    def add(self, adapter_name: str) -> None:
        _generation[0] += 1
        self._adapters[adapter_name] = {}
        self._updates[adapter_name] = []

    def fill(self, adapter_name: str, entries: dict[str, SparseEntries]) -> None:
        _generation[0] += 1
        self._adapters[adapter_name] = packed = _pack(entries)
        self._updates[adapter_name] = [(name, e.indices, e.values) for name, e in packed.items() if e.indices.numel()]

    def updates(self, adapter_name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(parameter, positions, values) for every parameter adapter `adapter_name` changes, ready to write.

        Positions stay int32 where they fit: `overwrite` indexes with them as they are (no widening per switch).
        """
        return self._updates[adapter_name]

    def share_values(self, adapter_name: str, name: str, values: torch.Tensor) -> None:
        """Hold `values`, a copy of the entry's values made elsewhere (the switch plan's), instead of its own, so
        that both are one memory. The entries stay equal, so a `SwitchPlan` compiled from them stays current."""
        entry = self._adapters[adapter_name][name]
        if values.shape != entry.values.shape or values.dtype != entry.values.dtype:
            raise ValueError(
                f"share_values: {adapter_name!r}/{name!r} holds {tuple(entry.values.shape)} {entry.values.dtype} "
                f"values, not {tuple(values.shape)} {values.dtype}"
            )
        self._adapters[adapter_name][name] = entry._replace(values=values)
        self._updates[adapter_name] = [
            (n, positions, values if n == name else v) for n, positions, v in self._updates[adapter_name]
        ]

    def is_loaded(self, adapter_name: str) -> bool:
        return bool(self._adapters.get(adapter_name))

    def nbytes(self, adapter_name: str) -> int:
        """Memory held by adapter `adapter_name` in this layer (positions + values)."""
        return sum(
            e.indices.numel() * e.indices.element_size() + e.values.numel() * e.values.element_size()
            for e in self._adapters[adapter_name].values()
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _generation[0] += 1  # a copy or an unpickled layer: entries that no `add` or `fill` announced

    # dict interface, as peft's BaseTunerLayer expects of `other_param_names` containers
    def __getitem__(self, adapter_name: str) -> dict[str, SparseEntries]:
        return self._adapters[adapter_name]

    def __delitem__(self, adapter_name: str) -> None:
        _generation[0] += 1
        del self._adapters[adapter_name]
        self._updates.pop(adapter_name, None)

    def __contains__(self, adapter_name: object) -> bool:
        return adapter_name in self._adapters

    def __iter__(self):
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def keys(self):
        return self._adapters.keys()

    def items(self):
        return self._adapters.items()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        for adapter, params in self._adapters.items():
            moved = {name: e._replace(indices=fn(e.indices), values=fn(e.values)) for name, e in params.items()}
            self.fill(adapter, moved)
        return self

    def extra_repr(self) -> str:
        return f"adapters={list(self._adapters)}"


def _pack(entries: dict[str, SparseEntries]) -> dict[str, SparseEntries]:
    """Put the positions of all parameters into one buffer; each `SparseEntries.indices` becomes a view of it.

    Memory is unchanged (views), and one allocation per layer and adapter instead of one per parameter.
    """
    written = [(name, e) for name, e in entries.items() if e.indices.numel()]
    kinds = {(e.indices.dtype, e.indices.device) for _, e in written}
    if len(kinds) != 1:  # nothing to write, or positions of mixed width/device (a parameter of >= 2**31 entries)
        return dict(entries)
    flat = torch.cat([e.indices.reshape(-1) for _, e in written])
    packed, start = dict(entries), 0
    for name, e in written:
        end = start + e.indices.numel()
        packed[name] = e._replace(indices=flat[start:end])
        start = end
    return packed


class RSTLayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer`; adapter `a` replaces each owned parameter p by `rst_weight[a][p]` in the forward pass."""

    adapter_layer_names = ("rst_weight",)
    other_param_names = ("rst_sparse",)

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config, shared: dict | None = None, allocate=None
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rst_weight = nn.ModuleDict({})  # trainable adapters: dense W per owned parameter
        self.rst_sparse = SparseAdapters()  # inference adapters: their changed entries only
        # inference adapter currently written into the base parameters, and the base values it replaced
        self._patched: str | None = None
        self._patch_backup: overwrite.Saved = []
        # adapter name -> the base values its merge replaced (see `overwrite`), to unmerge bit-exactly
        self._merge_backup: dict[str, overwrite.Saved] = {}
        self.merged_adapters: list[str] = []
        self._reset_groups: dict[str, Any] = {}  # adapter name -> its ResetGroup (see RSTModel._register_reset)
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self._dense_active = False  # whether an active adapter is trainable (dense W); kept by set_adapter
        # what peft's generic code and users read off a wrapped Linear/Conv/Embedding
        with warnings.catch_warnings():  # peft warns for module kinds it does not know; RST wraps any kind
            warnings.simplefilter("ignore", UserWarning)
            self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.update_layer(adapter_name, config, shared, allocate)
        # state_dict() shows w0 under the base keys and every inference adapter as a dense W (as peft expects)
        self.register_state_dict_post_hook(_state_dict_as_in_peft)
        self.register_load_state_dict_pre_hook(_take_inference_adapter_keys)
        self.register_load_state_dict_post_hook(_repatch_after_load)

    def __getattr__(self, name: str) -> Any:
        """Resolve the wrapped module's children through the wrapper.

        A module that owns bare parameters and has children (CLIP's vision embeddings) is wrapped while its
        children get wrapped too; peft finds those children by their original dotted names.
        """
        try:
            return super().__getattr__(name)
        except AttributeError:
            base_layer = self._modules.get("base_layer")
            if name != "base_layer" and base_layer is not None and name in base_layer._modules:
                return base_layer._modules[name]
            raise

    # ------------------------------------------------------------------ adapters
    def _base_parameters(self) -> dict[str, torch.Tensor]:
        # direct dict access: this runs for every layer on every adapter switch
        return {k: v for k, v in self.get_base_layer()._parameters.items() if v is not None}

    def update_layer(
        self, adapter_name: str, config, shared: dict[int, nn.Parameter] | None = None, allocate=None
    ) -> None:
        """Create adapter `adapter_name`.

        Trainable adapters get W = w0 (identity; a perturbed copy with init_weights=False). Adapters created in
        inference mode (`PeftModel.from_pretrained` without `is_trainable=True`) keep only their encoded sparse
        patch: memory per extra adapter is its file size, and activating one writes its entries into the base
        parameters in O(changed entries). `shared` maps id(base parameter) to the W already made for it by another
        layer (tied weights, e.g. input and output embeddings), so that a tied weight stays one trained tensor.
        `allocate(base)` (a `reset_plan.FlatAllocator`'s `take`) gives W's storage where it can, so that the reset
        plan finds every W laid out in one buffer already and copies nothing.
        """
        if config.inference_mode:
            # no parameters to create or to (un)freeze: other adapters' requires_grad flags are left as they are
            self.rst_sparse.add(adapter_name)
            self.sync_patch()
            return
        self.__dict__.pop("_tied", None)
        self.restore_base_weights()  # W starts from w0, not from a patched-in inference adapter
        weights = nn.ParameterDict()
        for name, base in self._base_parameters().items():
            if shared is not None and id(base) in shared:
                weights[name] = shared[id(base)]
                continue
            if base.device.type == "meta":
                copy = torch.empty_like(base, device="meta")
            else:
                copy = allocate(base) if allocate is not None else None
                copy = base.detach().clone() if copy is None else copy.copy_(base.detach())
                if not config.init_weights:
                    # Non-identity start for tests (peft's convention): a small perturbation of every entry.
                    noise = torch.randn(copy.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
                    copy.add_((noise * 0.1).to(copy.dtype).to(copy.device))
            weights[name] = nn.Parameter(copy, requires_grad=base.dtype.is_floating_point)
            if shared is not None:
                shared[id(base)] = weights[name]
        self.rst_weight[adapter_name] = weights
        self.set_adapter(self.active_adapters)

    def reset_targets(self, adapter_name: str) -> list[ResetTarget]:
        """W and w0 of every parameter of trainable adapter `adapter_name`, for the reset after an optimizer step.

        An active inference adapter is written into the base parameters; it is taken out first so that the reset
        compares W with the true w0 (the next forward puts it back), not with the patched values. This runs for
        every layer after every optimizer step, so it reads the instance dicts directly.
        """
        weights = self._modules["rst_weight"]._modules.get(adapter_name)
        if weights is None or self.merged_adapters:
            return []
        if self._patched is not None:
            self.restore_base_weights()
        base_layer = self._modules["base_layer"]
        if isinstance(base_layer, BaseTunerLayer):  # a wrapped tuner layer: w0 is in the innermost base layer
            base_layer = base_layer.get_base_layer()
        bases = base_layer._parameters
        owned = weights._parameters
        return [
            ResetTarget(
                weight=w,
                base=bases[name],
                is_bias=name == "bias" or name.endswith("_bias"),
                weight_owner=owned,
                base_owner=bases,
                name=name,
            )
            for name, w in owned.items()
        ]

    # ------------------------------------------------------------------ forward
    def _wanted_patch(self) -> str | None:
        """The inference adapter that should be written into the base parameters right now, if any."""
        if self._disable_adapters or self.merged_adapters:
            return None
        active = self._active_adapter
        if isinstance(active, str):
            active = [active]
        # an inference adapter is patched in once its entries are loaded (peft creates it empty, then loads)
        loaded = self._modules["rst_sparse"].is_loaded
        sparse = [a for a in active if loaded(a)]
        if not sparse:
            return None
        if len(active) > 1:
            raise ValueError(
                f"Adapters {active} are active together, which RST supports only for trainable adapters. "
                "Activate one inference adapter at a time, or load them with is_trainable=True."
            )
        return sparse[0]

    def sync_patch(self) -> None:
        """Make the base parameters hold w0 patched by the wanted inference adapter (O(changed entries)).

        This runs for every layer on every adapter switch, so it stays lean: direct dict access, plain attribute
        writes, and only the parameters the adapter changes, from a list made when the adapter was loaded. Positions
        are held as int32 (half the memory per loaded adapter) and used as they are.
        """
        wanted = self._wanted_patch()
        if wanted == self._patched:
            return
        self.restore_base_weights()
        if wanted is None:
            return
        updates = self._modules["rst_sparse"].updates(wanted)
        params = self._modules["base_layer"]._parameters
        state = self.__dict__  # plain attributes: skip nn.Module.__setattr__ on this hot path
        state["_patch_backup"] = overwrite.write_entries(params, updates, visible=False)
        state["_patched"] = wanted

    def restore_base_weights(self) -> None:
        """Undo the patch of an inference adapter, bit-exactly (base values were kept at the patched positions)."""
        state = self.__dict__
        if state["_patched"] is None:
            return
        overwrite.write_back(self._modules["base_layer"]._parameters, state["_patch_backup"], visible=False)
        state["_patch_backup"] = []
        state["_patched"] = None

    def load_sparse(self, adapter_name: str, entries: dict[str, SparseEntries]) -> None:
        """Give inference adapter `adapter_name` its changed entries (replacing any) and patch it in if active."""
        if self._patched == adapter_name:
            self.restore_base_weights()  # the base holds the entries being replaced
        self.rst_sparse.fill(adapter_name, entries)
        self.sync_patch()

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else adapter_names
        dense = self._modules.get("rst_weight")
        # BaseTunerLayer.set_adapter, except that W of a non-float parameter (e.g. quantisation metadata) never
        # requires grad (peft would raise), and that layers holding only inference adapters skip its module walks
        for adapter, weights in dense.items() if dense else ():
            wanted = adapter in names and not inference_mode
            for w in weights.values():
                if w.is_leaf:
                    w.requires_grad_(wanted and w.dtype.is_floating_point)
        if self.frozen_peft_weight_names:
            self._freeze_non_trainable_peft_weights(names)
        state = self.__dict__  # plain attributes: skip nn.Module.__setattr__ on this hot path
        state["_active_adapter"] = names
        state["_dense_active"] = bool(dense) and any(a in dense for a in names)
        sparse = self._modules.get("rst_sparse")
        if sparse is not None and len(sparse):
            self.sync_patch()

    def enable_adapters(self, enabled: bool) -> None:
        super().enable_adapters(enabled)
        if len(self.rst_sparse):
            self.sync_patch()

    def delete_adapter(self, adapter_name: str) -> None:
        self.__dict__.pop("_tied", None)
        if self._patched == adapter_name:
            self.restore_base_weights()
        group = self._reset_groups.pop(adapter_name, None)
        if group is not None:  # the adapter's reset hook stops once its last layer is gone
            group.layers = [layer for layer in group.layers if layer is not self]
            if not group.layers:
                unregister(group)
        super().delete_adapter(adapter_name)

    def adapter_entries(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(flat indices, new values) of the entries adapter `adapter_name` changes, per owned parameter."""
        self.restore_base_weights()
        bases = self._base_parameters()
        if adapter_name in self.rst_sparse:
            return {name: self._sparse_entries(adapter_name, name, base) for name, base in bases.items()}
        entries = {}
        for name, w in self.rst_weight[adapter_name].items():
            flat = w.detach().reshape(-1)
            idx = torch.nonzero(flat != bases[name].detach().reshape(-1).to(flat.dtype), as_tuple=True)[0]
            entries[name] = (idx, flat[idx])
        return entries

    def _sparse_entries(self, adapter_name: str, name: str, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat int64 indices, values) of parameter `name` of inference adapter `adapter_name`."""
        entries = self.rst_sparse[adapter_name].get(name)
        if entries is None:
            raise RuntimeError(
                f"Inference adapter '{adapter_name}' has no entries for parameter '{name}': it was created but never "
                "loaded. Load it with PeftModel.from_pretrained / load_adapter before using it."
            )
        return entries.indices.to(device=base.device, dtype=torch.long), entries.values.to(base.device)

    def _effective_parameters(self, adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """Parameters to run the base layer with: W of the active adapter (w0 + sum of deltas if several)."""
        bases = self._base_parameters()
        active = [a for a in adapter_names if a in self.rst_weight]
        if len(active) == 1:
            weights = self.rst_weight[active[0]]
            return {
                name: w if w.dtype == bases[name].dtype else w.to(bases[name].dtype) for name, w in weights.items()
            }
        effective = {}
        for name, base in bases.items():
            value = base
            for adapter in active:
                value = value + (self.rst_weight[adapter][name].to(base.dtype) - base)
            effective[name] = value
        return effective

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling():
            # Read no Python state that names adapters: `set_adapter` / `enable_adapters` write inference adapters
            # into the base eagerly, so switching domains reuses the compiled graph (see peft_rst/hotswap.py).
            if self._disable_adapters or self.merged or not self._dense_active:
                return self.base_layer(*args, **kwargs)
            return functional_call(
                self.base_layer, self._effective_parameters(self.active_adapters), args, kwargs, strict=False
            )
        # Eager: this runs for every wrapped module on every call, so it reads instance dicts directly.
        if self._disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            self.restore_base_weights()
            return self.base_layer(*args, **kwargs)
        modules = self._modules
        if _generation[0] and len(modules["rst_sparse"]):  # no inference adapter in the process: nothing to look at
            self.sync_patch()  # cheap when nothing changed; covers adapters toggled behind peft's back
        active = self._active_adapter
        if not isinstance(active, str) and len(active) == 1:
            active = active[0]
        dense = modules["rst_weight"]._modules
        if isinstance(active, str):
            weights = dense.get(active)
            if self._dense_active is (weights is None):  # set only on change: nn.Module.__setattr__ is slow
                self._dense_active = weights is not None
            if weights is None or self.merged_adapters:
                return modules["base_layer"](*args, **kwargs)
            base = modules["base_layer"]
            if not base._modules or not self._tied_below():  # no functional_call needed (see _run_leaf)
                return _run_leaf(base, _cast_to_base(weights._parameters, base._parameters), args, kwargs)
        else:
            dense_active = any(a in dense for a in active)
            if self._dense_active != dense_active:
                self._dense_active = dense_active
            if self.merged_adapters or not dense_active:
                return modules["base_layer"](*args, **kwargs)
        return functional_call(
            self.base_layer, self._effective_parameters(self.active_adapters), args, kwargs, strict=False
        )

    def _tied_below(self) -> bool:
        """Whether a parameter the base module owns is also held by one of its submodules (a tie).

        Only then does the forward need `functional_call`, which re-parametrises the tied copies too; otherwise
        swapping the module's own `_parameters` entries is the same re-parametrisation at a fraction of the cost
        (the submodules RST wraps run with their own W). Computed once per adapter set (`update_layer`,
        `delete_adapter` forget it): a tie made later by hand is not seen.
        """
        tied = self.__dict__.get("_tied")
        if tied is None:
            base = self._modules["base_layer"]
            own = {id(p) for p in base._parameters.values() if p is not None}
            tied = any(id(p) in own for child in base.children() for p in child.parameters())
            self.__dict__["_tied"] = tied
        return tied

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Dense W - w0 per owned parameter (for inspection; merging uses exact copies, not deltas)."""
        bases = self._base_parameters()
        return {
            name: (w.detach().to(bases[name].dtype) - bases[name]) for name, w in self.rst_weight[adapter_name].items()
        }

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write the adapter's changed entries into the base parameters, remembering what they replaced.

        A single merged adapter gives bitwise the adapted weights. Merging several adds their deltas (w0 + sum).
        Cost is O(changed entries) for inference adapters, plus one comparison pass for trainable ones.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.restore_base_weights()
        for adapter in adapter_names:
            if adapter not in self.rst_weight and adapter not in self.rst_sparse:
                continue
            bases = self._base_parameters()
            if not self.merged_adapters:
                updates = [(name, idx, new) for name, (idx, new) in self.adapter_entries(adapter).items()]
            else:
                # another adapter is merged already: add this adapter's delta against the original w0
                updates = []
                for name, base in bases.items():
                    original = overwrite.original_values(self._merge_backup.values(), name, base)
                    idx, values = self._entries_against(adapter, name, original)
                    current = base.detach().reshape(-1)[idx]
                    updates.append((name, idx, current + (values.to(base.dtype) - original[idx])))
            if safe_merge:
                for name, _, new in updates:
                    if not torch.isfinite(new).all():
                        raise ValueError(
                            f"NaNs or infs detected in the merged weights of adapter '{adapter}' ({name}); "
                            "the adapter seems to be broken. Nothing was merged for this layer."
                        )
            self._merge_backup[adapter] = overwrite.write_entries(bases, updates, visible=True)
            self.merged_adapters.append(adapter)

    def _entries_against(self, adapter: str, name: str, original: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if adapter in self.rst_sparse:
            return self._sparse_entries(adapter, name, original)
        flat = self.rst_weight[adapter][name].detach().reshape(-1)
        idx = torch.nonzero(flat != original.to(flat.dtype), as_tuple=True)[0]
        return idx, flat[idx]

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        bases = self._base_parameters()
        while self.merged_adapters:
            overwrite.write_back(bases, self._merge_backup.pop(self.merged_adapters.pop()), visible=True)

    # ------------------------------------------------------------------ state_dict
    def _w0(self, name: str) -> torch.Tensor:
        """w0 of base parameter `name`: the parameter itself, or a copy with the active patch taken out."""
        base = self._modules["base_layer"]._parameters[name].detach()
        saved = [entry for entry in self._patch_backup if entry[0] == name]
        if not saved:
            return base
        return overwrite.original_values([saved], name, base).view(base.shape)

    def _add_peft_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Make `state_dict` what peft gives for trainable adapters: base keys hold w0, each adapter its W.

        Inference adapters hold only their changed entries, and the active one is written into the base; here the
        base keys get w0 back (a copy of each patched parameter) and each loaded inference adapter a dense W
        (w0 with its entries), built for this call only. `keep_vars=True` callers get the live parameters; peft's
        own adapter saving reads the entries directly, so nothing is materialised there.
        """
        sparse = self._modules.get("rst_sparse")
        if (sparse is None or not len(sparse)) or _in_adapter_save():
            return
        base_prefix = f"{prefix}base_layer."
        for name, param in self._modules["base_layer"]._parameters.items():
            key = base_prefix + name
            if param is None or key not in state_dict or state_dict[key] is param:
                continue  # keep_vars=True: the caller wants the parameters themselves
            w0 = self._w0(name)
            state_dict[key] = w0
            for adapter, entries in sparse.items():
                e = entries.get(name)
                if e is None or adapter in self.rst_weight:
                    continue
                dense = w0.to(e.values.dtype, copy=True).view(-1)
                dense[e.indices.to(device=dense.device, dtype=torch.long)] = e.values.to(dense.device)
                state_dict[f"{prefix}{_CONTAINER}.{adapter}.{name}"] = dense.view(w0.shape)

    def _take_adapter_keys(self, state_dict: dict[str, Any], prefix: str) -> None:
        """`load_state_dict` of what `state_dict()` gives: dense W of inference adapters become their entries again.

        The base receives w0 from the state dict (the active patch is taken out first, and written in again by
        `_repatch_after_load`); an inference adapter's W is stored as the entries where it differs from w0.
        """
        sparse = self._modules.get("rst_sparse")
        if sparse is None or not len(sparse):
            return
        self.restore_base_weights()
        base_prefix = f"{prefix}base_layer."
        for adapter in [a for a in sparse if a not in self.rst_weight]:
            updated = {}
            for name, param in self._modules["base_layer"]._parameters.items():
                dense = state_dict.pop(f"{prefix}{_CONTAINER}.{adapter}.{name}", None)
                if param is None or dense is None:
                    continue
                w0 = state_dict.get(base_prefix + name, param).detach()
                dense = dense.detach().to(param.device).reshape(-1)
                idx = torch.nonzero(dense != w0.reshape(-1).to(device=dense.device, dtype=dense.dtype), as_tuple=True)
                idx = idx[0]
                old = sparse[adapter].get(name)
                fingerprint = old.base_fingerprint if old is not None else rst_format.tensor_fingerprint(w0)
                data = rst_format.SparseTensorData(idx, dense[idx], dense.numel(), fingerprint)
                updated[name] = SparseEntries.from_data(data, param.device)
            if updated:
                sparse.fill(adapter, {**sparse[adapter], **updated})

    def __repr__(self) -> str:
        return "rst." + super().__repr__()


# ---------------------------------------------------------------------------------------------- forward helpers
# Module kinds whose forward is one functional op on (input, weight, bias): with no hooks, RST calls the op with W
# directly. Exact types only: a subclass may override forward (quantised layers, parametrizations).
_DIRECT_OPS: dict[type, Any] = {
    nn.Linear: lambda module, x, weight, bias: F.linear(x, weight, bias),
    NonDynamicallyQuantizableLinear: lambda module, x, weight, bias: F.linear(x, weight, bias),
    nn.LayerNorm: lambda module, x, weight, bias: F.layer_norm(x, module.normalized_shape, weight, bias, module.eps),
    nn.Conv1d: lambda module, x, weight, bias: module._conv_forward(x, weight, bias),
    nn.Conv2d: lambda module, x, weight, bias: module._conv_forward(x, weight, bias),
    nn.Embedding: lambda module, x, weight, bias: F.embedding(
        x, weight, module.padding_idx, module.max_norm, module.norm_type, module.scale_grad_by_freq, module.sparse
    ),
}


def _cast_to_base(weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """`weights` as they are, or cast to the base parameters' dtypes (peft keeps W in fp32 for fp16/bf16 bases)."""
    for name, w in weights.items():
        base = params.get(name)
        if base is not None and w.dtype != base.dtype:
            return {
                n: w if (b := params.get(n)) is None or w.dtype == b.dtype else w.to(b.dtype)
                for n, w in weights.items()
            }
    return weights


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _global_forward_hooks
        or _global_forward_pre_hooks
        or _global_backward_hooks
        or _global_backward_pre_hooks
    )


def _run_leaf(module: nn.Module, weights: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> Any:
    """Run a module as if its own parameters were `weights` (what `functional_call` does), for a module whose own
    parameters no submodule holds too (a leaf, or e.g. CLIP's vision embeddings with its `class_embedding`).

    `functional_call` re-parametrises through a module walk, tie detection and a context manager on every call.
    With nothing tied, swapping the entries of the module's `_parameters` dict and putting them back is the same
    re-parametrisation (hooks run, autograd reaches W); for a hook-free Linear or LayerNorm, the op itself is called
    with W.
    """
    op = _DIRECT_OPS.get(type(module))
    if op is not None and len(args) == 1 and not kwargs and not _has_hooks(module):
        params = module._parameters
        return op(module, args[0], weights.get("weight", params["weight"]), weights.get("bias", params.get("bias")))
    params = module._parameters
    saved = {name: params[name] for name in weights if name in params}
    try:
        params.update(weights)
        return module(*args, **kwargs)
    finally:
        for name in weights:
            if name in saved:
                params[name] = saved[name]
            else:
                del params[name]


_CONTAINER = RSTLayer.adapter_layer_names[0]


def _state_dict_as_in_peft(module: RSTLayer, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    module._add_peft_state(state_dict, prefix)


def _take_inference_adapter_keys(module: RSTLayer, state_dict: dict, prefix: str, *args: Any) -> None:
    module._take_adapter_keys(state_dict, prefix)


def _repatch_after_load(module: RSTLayer, incompatible_keys: Any) -> None:
    if len(module.rst_sparse):
        module.sync_patch()


def _in_adapter_save() -> bool:
    """Whether peft's `get_peft_model_state_dict` is on the stack: it reads inference adapters' entries directly."""
    from peft.utils.save_and_load import get_peft_model_state_dict

    code = inspect.unwrap(get_peft_model_state_dict).__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
