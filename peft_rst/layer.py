"""The RST tuner layer: one wrapper for every kind of module that owns parameters.

Design (b) of docs/design: the base layer keeps w0 untouched and each adapter holds a trainable dense copy W of
every parameter the wrapped module owns directly (weight, bias, or bare `nn.Parameter`s such as CLIP's
`class_embedding`). The forward pass runs the base module with W swapped in (`torch.func.functional_call`), so one
class serves Linear, Conv, Embedding, norms, transformers' Conv1D and any custom module, and W is updated exactly as
the weight of a fully fine-tuned model would be, which is what makes the reset of Algorithm 1 bit-exact.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call

from .reset import ResetTarget


class RSTLayer(nn.Module, BaseTunerLayer):
    """Wraps `base_layer`; adapter `a` replaces each owned parameter p by `rst_weight[a][p]` in the forward pass."""

    adapter_layer_names = ("rst_weight",)
    other_param_names = ()

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.rst_weight = nn.ModuleDict({})
        # adapter name -> list of (flat indices, previous values) per merged parameter, to unmerge bit-exactly
        self._merge_backup: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        self.update_layer(adapter_name, config)

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
        return dict(self.get_base_layer().named_parameters(recurse=False))

    def update_layer(self, adapter_name: str, config) -> None:
        """Create adapter `adapter_name`: W = w0 (identity), or a perturbed copy with init_weights=False."""
        weights = nn.ParameterDict()
        for name, base in self._base_parameters().items():
            if base.device.type == "meta":
                copy = torch.empty_like(base, device="meta")
            else:
                copy = base.detach().clone()
                if not config.init_weights:
                    # Non-identity start for tests (peft's convention): a small perturbation of every entry.
                    noise = torch.randn(copy.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
                    copy.add_((noise * 0.1).to(copy.dtype).to(copy.device))
            weights[name] = nn.Parameter(copy, requires_grad=base.dtype.is_floating_point)
        self.rst_weight[adapter_name] = weights
        self.set_adapter(self.active_adapters)

    def reset_targets(self, adapter_name: str) -> list[ResetTarget]:
        if adapter_name not in self.rst_weight or self.merged:
            return []
        bases = self._base_parameters()
        return [
            ResetTarget(weight=w, base=bases[name], is_bias=name == "bias" or name.endswith("_bias"))
            for name, w in self.rst_weight[adapter_name].items()
        ]

    # ------------------------------------------------------------------ forward
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
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(*args, **kwargs)
        if self.merged or not any(a in self.rst_weight for a in self.active_adapters):
            return self.base_layer(*args, **kwargs)
        return functional_call(
            self.base_layer, self._effective_parameters(self.active_adapters), args, kwargs, strict=False
        )

    # ------------------------------------------------------------------ merge
    def get_delta_weight(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """Dense W - w0 per owned parameter (for inspection; merging uses exact copies, not deltas)."""
        bases = self._base_parameters()
        return {
            name: (w.detach().to(bases[name].dtype) - bases[name]) for name, w in self.rst_weight[adapter_name].items()
        }

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write W into the base parameters; only changed entries are touched and remembered for `unmerge`.

        A single merged adapter gives bitwise the adapted weights. Merging several adds their deltas (w0 + sum).
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        bases = self._base_parameters()
        for adapter in adapter_names:
            if adapter not in self.rst_weight:
                continue
            backup = {}
            updates = {}
            for name, w in self.rst_weight[adapter].items():
                base = bases[name]
                flat_base = base.data.view(-1)
                flat_w = w.detach().view(-1).to(base.dtype)
                if self.merged_adapters:
                    # another adapter is merged already: add this adapter's delta against the original w0
                    original = self._original_base(name)
                    idx = torch.nonzero(flat_w != original, as_tuple=True)[0]
                    new = flat_base[idx] + (flat_w[idx] - original[idx])
                else:
                    idx = torch.nonzero(flat_w != flat_base, as_tuple=True)[0]
                    new = flat_w[idx]
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"NaNs or infs detected in the merged weights of adapter '{adapter}' ({name}); "
                        "the adapter seems to be broken. Nothing was merged for this layer."
                    )
                updates[name] = (idx, new)
                backup[name] = (idx, flat_base[idx].clone())
            for name, (idx, new) in updates.items():
                bases[name].data.view(-1)[idx] = new
            self._merge_backup[adapter] = backup
            self.merged_adapters.append(adapter)

    def _original_base(self, name: str) -> torch.Tensor:
        """w0 of parameter `name` reconstructed from the merge backups (the base currently holds merged values)."""
        flat = self._base_parameters()[name].data.view(-1).clone()
        for adapter in reversed(self.merged_adapters):
            idx, previous = self._merge_backup[adapter][name]
            flat[idx] = previous
        return flat

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        bases = self._base_parameters()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for name, (idx, previous) in self._merge_backup.pop(adapter).items():
                bases[name].data.view(-1)[idx] = previous

    def __repr__(self) -> str:
        return "rst." + super().__repr__()
