"""Hotswap an RST adapter: replace the values of a loaded adapter in place, keeping its name, modules and graph.

peft's `hotswap_adapter` supports LoRA only. For RST the swap is simpler than for LoRA: an inference adapter is a
set of changed entries per parameter (no rank or scaling to pad), and a trainable one a dense W the size of the base
parameter. The new checkpoint is read through the model's own loader under a scratch name (so it gets every check a
load gets: encoding, sizes, base-weight fingerprint), its values are moved into the adapter being replaced (inference
entries by reference, dense W and `modules_to_save` weights with in-place copies, so no parameter changes identity),
and the scratch adapter is deleted. Coverage is compared before anything is loaded: an adapter that targets other
modules is refused and the model is left as it was.

Domain switching under `torch.compile` needs no hotswap: `RSTLayer.forward` reads no adapter names while compiling,
and `set_adapter` writes the chosen inference adapter into the base outside the graph, so switching reuses the
compiled graph. Compile the model that holds the layers (a transformers model, or `peft_model.get_base_model()`):
`PeftModel.forward` itself reads the active adapter's config, so a compiled `PeftModel` recompiles per adapter name
(as with LoRA); `hotswap_adapter` keeps the name and avoids that.
"""

from __future__ import annotations

import uuid

import torch
from peft import PeftConfig, PeftModel
from torch import nn

from .config import RSTPeftType
from .layer import RSTLayer
from .model import RSTModel, resolve_parameter_owners

__all__ = ["HotswapError", "hotswap_adapter"]


class HotswapError(ValueError):
    """The new adapter cannot replace the loaded one in place; the model was left unchanged."""


def _root(model: nn.Module) -> nn.Module:
    """The module that holds the RST layers (the wrapped model of a PeftModel, else the model itself)."""
    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, RSTModel):
            raise HotswapError(
                f"This PeftModel holds {type(model.base_model).__name__} adapters, not RST; for LoRA use "
                "peft.utils.hotswap.hotswap_adapter."
            )
        return model.get_base_model()
    return model


def _covered(root: nn.Module, adapter_name: str) -> dict[str, RSTLayer]:
    return {
        name: m
        for name, m in root.named_modules()
        if isinstance(m, RSTLayer) and (adapter_name in m.rst_weight or adapter_name in m.rst_sparse)
    }


def _saved_wrappers(root: nn.Module, adapter_name: str) -> dict[str, nn.Module]:
    from peft.utils import ModulesToSaveWrapper

    return {
        name: m
        for name, m in root.named_modules()
        if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
    }


def _check_swappable(root: nn.Module, adapter_name: str, old_config, new_config) -> dict[str, RSTLayer]:
    """The layers of `adapter_name`, after checking that `new_config` covers exactly the same parameters."""
    if getattr(new_config, "peft_type", None) != RSTPeftType.RST:
        raise HotswapError(
            f"The new adapter is a {getattr(new_config, 'peft_type', None)} adapter; only an RST adapter can replace "
            f"RST adapter '{adapter_name}' (peft.utils.hotswap.hotswap_adapter handles LoRA)."
        )
    layers = _covered(root, adapter_name)
    if any(layer.merged_adapters for layer in layers.values()):
        raise HotswapError(f"Adapter '{adapter_name}' is merged into the base; call unmerge_adapter() first.")
    wanted = set(resolve_parameter_owners(new_config, root))
    if wanted != set(layers):
        extra, lacking = sorted(wanted - set(layers)), sorted(set(layers) - wanted)
        raise HotswapError(
            f"The new adapter targets other modules than adapter '{adapter_name}' ({len(extra)} more, e.g. "
            f"{extra[:3]}; {len(lacking)} fewer, e.g. {lacking[:3]}), so it cannot be swapped in place. Load it as "
            "another adapter with load_adapter(path, adapter_name=...) instead."
        )
    old_saved = sorted(old_config.modules_to_save or [])
    new_saved = sorted(new_config.modules_to_save or [])
    if old_saved != new_saved:
        raise HotswapError(
            f"The new adapter saves modules {new_saved}, adapter '{adapter_name}' saves {old_saved}; they cannot be "
            "swapped in place. Load it as another adapter instead."
        )
    return layers


def _load_scratch(model: nn.Module, path: str, scratch: str, config, hub_kwargs: dict) -> None:
    if isinstance(model, PeftModel):
        model.load_adapter(path, adapter_name=scratch, is_trainable=False, **hub_kwargs)
    else:
        from .transformers_integration import load_rst_adapter

        load_rst_adapter(model, path, scratch, config, is_trainable=False, hub_kwargs=hub_kwargs)


@torch.no_grad()
def _move_values(root: nn.Module, layers: dict[str, RSTLayer], adapter_name: str, scratch: str) -> None:
    """Give `adapter_name` the values of `scratch` (checked to cover the same parameters), in place."""
    plans = []
    for name, layer in layers.items():
        new = dict(layer.rst_sparse[scratch])
        old = layer.rst_sparse[adapter_name] if adapter_name in layer.rst_sparse else layer.rst_weight[adapter_name]
        if set(new) != set(old):
            raise HotswapError(
                f"{name}: the new adapter has parameters {sorted(new)}, adapter '{adapter_name}' has {sorted(old)}."
            )
        plans.append((layer, new))
    saved = _saved_wrappers(root, adapter_name)
    for name, wrapper in saved.items():
        if scratch not in wrapper.modules_to_save:
            raise HotswapError(f"The new adapter has no weights for the saved module '{name}'.")
    # every check has passed: from here on, nothing can be refused
    for layer, new in plans:
        if adapter_name in layer.rst_sparse:
            layer.load_sparse(adapter_name, new)  # re-patches the base if this adapter is active
            continue
        layer.restore_base_weights()  # the base must hold w0 to rebuild W = w0 + entries
        bases = layer._base_parameters()
        for param_name, entries in new.items():
            weight = layer.rst_weight[adapter_name][param_name]
            flat = weight.data.view(-1)
            flat.copy_(bases[param_name].detach().reshape(-1).to(weight.dtype))
            idx = entries.indices.to(device=flat.device, dtype=torch.long)
            flat.index_copy_(0, idx, entries.values.to(device=flat.device, dtype=flat.dtype))
    for wrapper in saved.values():
        target, source = wrapper.modules_to_save[adapter_name], wrapper.modules_to_save[scratch]
        for (_, dst), (_, src) in zip(target.state_dict(keep_vars=True).items(), source.state_dict().items()):
            dst.data.copy_(src)


def hotswap_adapter(model: nn.Module, model_name_or_path: str, adapter_name: str = "default", **kwargs) -> None:
    """Replace the values of loaded RST adapter `adapter_name` by those saved at `model_name_or_path`, in place.

    Works on a `PeftModel` and on a transformers model with RST adapters (`load_adapter(..., hotswap=True)` calls
    it). The adapter keeps its name, active state, trainability and config (tau and schedules stay those of the
    loaded adapter); its modules and parameters keep their identity, so a compiled model runs the new values
    without recompiling. `kwargs` are download arguments (`subfolder`, `revision`, `cache_dir`, `token`, ...).

    Raises `HotswapError` (or the loader's error for a bad checkpoint) and leaves the model unchanged if the new
    adapter is not RST, targets other modules, saves other modules, or was trained from other base weights.
    """
    root = _root(model)
    if adapter_name not in (getattr(model, "peft_config", None) or {}):
        loaded = list(getattr(model, "peft_config", None) or {})
        raise HotswapError(f"No adapter named '{adapter_name}' is loaded (loaded: {loaded}); load it first.")
    new_config = PeftConfig.from_pretrained(str(model_name_or_path), **kwargs)
    layers = _check_swappable(root, adapter_name, model.peft_config[adapter_name], new_config)
    # loading the scratch adapter for inference switches to eval() and freezes saved modules: keep both as they were
    modes = {m: m.training for m in model.modules()}
    trainable = {p: p.requires_grad for p in model.parameters()}
    scratch = f"rst_hotswap_{uuid.uuid4().hex[:8]}"
    try:
        _load_scratch(model, str(model_name_or_path), scratch, new_config, kwargs)
        try:
            _move_values(root, layers, adapter_name, scratch)
        finally:
            model.delete_adapter(scratch)
    finally:
        for module, mode in modes.items():
            module.training = mode
        for param, flag in trainable.items():
            param.requires_grad_(flag)
        for layer in _covered(root, adapter_name).values():
            layer.sync_patch()
