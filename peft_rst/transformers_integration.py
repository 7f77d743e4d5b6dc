"""transformers' adapter API for RST: `PreTrainedModel.load_adapter`, and through it `from_pretrained` / `pipeline`.

transformers 5 loads adapter weights with its own checkpoint loader: it renames the saved keys and copies each one
into the model parameter of that name. RST saves sparse parts (`<param>.idx` / `<param>.val`) that match no
parameter (inference adapters hold decoded entries, not parameters; trainable ones a dense W), so that loader
reported every key as unexpected and returned a model without the adapter. transformers has no per-method hook in
that path, so `install()` wraps `PeftAdapterMixin.load_adapter` once: an adapter whose config says RST is loaded the
way peft loads it (`inject_adapter_in_model` + `set_peft_model_state_dict`, whose tuner hook
`RSTModel._remap_adapter_state_dict_for_load` runs RST's decoder and checks); every other method reaches
transformers' own code unchanged. The upstream proposal (a tuner-class hook in `load_adapter`) is in docs/rst.md.
"""

from __future__ import annotations

import contextvars
import functools
import json
from typing import Any

from torch import nn

from . import format as rst_format
from .config import RSTPeftType
from .loading import HandedFile

_HUB_KEYS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")
_ATTR = "_peft_rst_wrapped"
# set while transformers' adapter methods run on a model whose adapters are all RST (see `_rst_call`)
_RST_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_rst_transformers_call", default=False)
# the adapter methods that transformers gates behind its minimum peft version
_GATED_METHODS = (
    "set_adapter",
    "disable_adapters",
    "enable_adapters",
    "active_adapters",
    "add_adapter",
    "delete_adapter",
    "get_adapter_state_dict",
)


def _hub_kwargs(load_config, adapter_kwargs: dict | None, kwargs: dict, local_files_only: bool) -> dict[str, Any]:
    """The download arguments transformers would use for the adapter (config and weights from the same place)."""
    merged: dict[str, Any] = {}
    if load_config is not None:
        merged.update(getattr(load_config, "download_kwargs", None) or {})
    merged.update({k: v for k, v in kwargs.items() if k in _HUB_KEYS})
    merged.update(adapter_kwargs or {})
    if local_files_only:
        merged["local_files_only"] = True
    return {k: v for k, v in merged.items() if k in _HUB_KEYS and v is not None}


def _rst_config(peft_model_id, peft_config, hub_kwargs: dict):
    """The adapter's config if it is an RST adapter, else None (then transformers handles it)."""
    from peft import PeftConfig
    from transformers.utils import find_adapter_config_file

    if peft_config is not None:
        if isinstance(peft_config, dict):
            if str(peft_config.get("peft_type")) != RSTPeftType.RST.value:
                return None
            return PeftConfig.from_peft_type(**peft_config)
        return peft_config if getattr(peft_config, "peft_type", None) == RSTPeftType.RST else None
    if peft_model_id is None:
        return None
    config_file = find_adapter_config_file(peft_model_id, **hub_kwargs)
    if config_file is None:
        return None
    with open(config_file, encoding="utf-8") as f:
        if json.load(f).get("peft_type") != RSTPeftType.RST.value:
            return None
    return PeftConfig.from_pretrained(peft_model_id, **hub_kwargs)


def _tuner_modules(model: nn.Module) -> set[int]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    return {id(m) for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))}


def _roll_back(model: nn.Module, adapter_name: str, before: set[int], had_adapters: bool) -> None:
    """Take out what a failed load added: the adapter, and wrappers that did not exist before it."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils import AuxiliaryTrainingWrapper

    from .layer import RSTLayer

    for module in model.modules():
        if isinstance(module, RSTLayer):
            module.restore_base_weights()
        if id(module) not in before:
            continue
        # an adapter that existed before stays; only the failed one goes
        if isinstance(module, RSTLayer) and (adapter_name in module.rst_sparse or adapter_name in module.rst_weight):
            module.delete_adapter(adapter_name)
        elif isinstance(module, AuxiliaryTrainingWrapper) and adapter_name in getattr(module, "modules_to_save", {}):
            module.delete_adapter(adapter_name, new_active_adapters=None)
    # unwrap the wrappers made for this adapter, innermost first so that outer names stay valid
    new = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and id(m) not in before
    ]
    for name, module in reversed(new):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, RSTLayer):
            parent = parent.get_base_layer()
        original = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module.original_module
        setattr(parent, child, original)
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict):
        peft_config.pop(adapter_name, None)
    if not had_adapters:
        if "peft_config" in model.__dict__:
            del model.peft_config
        model._hf_peft_config_loaded = False
    for module in model.modules():
        if isinstance(module, RSTLayer):
            module.sync_patch()


def load_rst_adapter(
    model: nn.Module,
    peft_model_id: str | None,
    adapter_name: str,
    config,
    adapter_state_dict: dict | None = None,
    is_trainable: bool = False,
    low_cpu_mem_usage: bool = False,
    hub_kwargs: dict | None = None,
):
    """Inject RST adapter `adapter_name` into a transformers model and load its weights; all or nothing.

    Returns transformers' `LoadStateDictInfo` (empty: every checkpoint key was used, or this raised).
    """
    import copy

    from peft import inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils.save_and_load import load_peft_weights

    if adapter_name in (getattr(model, "peft_config", None) or {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    config = copy.copy(config)
    config.inference_mode = not is_trainable
    if adapter_state_dict is None:
        if peft_model_id is None:
            raise ValueError("Pass `peft_model_id` (a folder or Hub id) or `adapter_state_dict` to load an adapter.")
        # read (and fail on a missing file) before the model is touched
        adapter_state_dict = load_peft_weights(str(peft_model_id), device="cpu", **dict(hub_kwargs or {}))
    source = f"adapter '{adapter_name}'"
    # the file's checksums cover its tensors under its own keys: check them before the model is touched
    rst_format.check_integrity(adapter_state_dict, source)
    # saved from a PeftModel: keys start with its prefix, which a transformers model's module names lack; the tuner
    # hook maps them back to the file's keys for its own check (HandedFile)
    handed = HandedFile(adapter_state_dict, lambda key: key.removeprefix("base_model.model."), source)
    had_adapters = bool(getattr(model, "_hf_peft_config_loaded", False) and getattr(model, "peft_config", None))
    before = _tuner_modules(model)
    # peft's injection freezes every parameter that is not the new adapter's
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        inject_adapter_in_model(config, model, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        model._hf_peft_config_loaded = True
        with handed.handing_on():
            result = set_peft_model_state_dict(model, handed.handed, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
        unexpected = sorted(result.unexpected_keys)
        missing = sorted(
            k for k in result.missing_keys if f".{adapter_name}." in k and (".rst_" in k or "modules_to_save" in k)
        )
        if unexpected or missing:
            raise ValueError(
                f"RST adapter '{adapter_name}' does not fit this model: {len(unexpected)} checkpoint keys match no "
                f"adapter parameter (first: {unexpected[:3]}), {len(missing)} adapter parameters are not in the "
                f"checkpoint (first: {missing[:3]}). Load it onto the base model it was trained on."
            )
    except BaseException:
        _roll_back(model, adapter_name, before, had_adapters)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        raise
    if config.inference_mode:
        model.eval()  # what transformers' load_adapter does for an inference adapter
    return _empty_info()


def _empty_info():
    from transformers.utils.loading_report import LoadStateDictInfo

    return LoadStateDictInfo(
        missing_keys=set(),
        unexpected_keys=set(),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )


def _wrap_load_adapter(original):
    @functools.wraps(original)
    def load_adapter(
        self,
        peft_model_id: str | None = None,
        adapter_name: str | None = None,
        peft_config: Any = None,
        adapter_state_dict: dict | None = None,
        low_cpu_mem_usage: bool = False,
        is_trainable: bool = False,
        hotswap: Any = "auto",
        local_files_only: bool = False,
        adapter_kwargs: dict | None = None,
        load_config: Any = None,
        **kwargs,
    ):
        if peft_model_id is None and load_config is not None:
            peft_model_id = getattr(load_config, "pretrained_model_name_or_path", None)
        hub = _hub_kwargs(load_config, adapter_kwargs, kwargs, local_files_only)
        config = _rst_config(peft_model_id, peft_config, hub)
        if config is None:
            return original(
                self,
                peft_model_id=peft_model_id,
                adapter_name=adapter_name,
                peft_config=peft_config,
                adapter_state_dict=adapter_state_dict,
                low_cpu_mem_usage=low_cpu_mem_usage,
                is_trainable=is_trainable,
                hotswap=hotswap,
                local_files_only=local_files_only,
                adapter_kwargs=adapter_kwargs,
                load_config=load_config,
                **kwargs,
            )
        adapter_name = adapter_name or "default"
        loaded = getattr(self, "_hf_peft_config_loaded", False) and adapter_name in (
            getattr(self, "peft_config", None) or {}
        )
        if hotswap == "auto":
            hotswap = bool(getattr(self, "_hotswap_enabled", False) and loaded)
        if hotswap:
            from .hotswap import hotswap_adapter

            if adapter_state_dict is not None or peft_model_id is None:
                raise ValueError("Hotswapping an RST adapter needs its folder or Hub id (`peft_model_id`).")
            hotswap_adapter(self, peft_model_id, adapter_name, **hub)
            return _empty_info()
        return load_rst_adapter(
            self,
            peft_model_id,
            adapter_name,
            config,
            adapter_state_dict=adapter_state_dict,
            is_trainable=is_trainable,
            low_cpu_mem_usage=low_cpu_mem_usage,
            hub_kwargs=hub,
        )

    setattr(load_adapter, _ATTR, True)
    return load_adapter


def _is_rst_only(model: nn.Module, args: tuple) -> bool:
    """Whether every adapter of `model` (and an adapter config being added) is RST."""
    configs = list((getattr(model, "peft_config", None) or {}).values())
    configs += [a for a in args if hasattr(a, "peft_type")]
    return bool(configs) and all(getattr(c, "peft_type", None) == RSTPeftType.RST for c in configs)


def _rst_call(original):
    """Run transformers' adapter method `original`; for RST-only models, past its peft version gate.

    transformers 5.2x requires a peft newer than any release for these methods (`MIN_PEFT_VERSION`); what they use
    of peft (`BaseTunerLayer`, `ModulesToSaveWrapper`, the state-dict functions) is in every peft that
    `peft_rst.check_peft_compatibility` accepts, so for RST adapters the gate is waived. Other methods' adapters
    still meet transformers' check unchanged.
    """

    @functools.wraps(original)
    def method(self, *args, **kwargs):
        if not _is_rst_only(self, args + tuple(kwargs.values())):
            return original(self, *args, **kwargs)
        token = _RST_CALL.set(True)
        try:
            result = original(self, *args, **kwargs)
            if original.__name__ == "enable_adapters":
                _enable_saved_modules(self)
            return result
        finally:
            _RST_CALL.reset(token)

    setattr(method, _ATTR, True)
    return method


def _enable_saved_modules(model: nn.Module) -> None:
    """transformers' `enable_adapters` re-enables tuner layers but not the `modules_to_save` copies that
    `disable_adapters` turned off; an RST classifier head would stay at its pretrained weights."""
    from peft.utils import AuxiliaryTrainingWrapper

    for module in model.modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            module.enable_adapters(True)


def _gate(original_check):
    @functools.wraps(original_check)
    def check_peft_version(min_version: str) -> None:
        if _RST_CALL.get():
            return
        original_check(min_version)

    setattr(check_peft_version, _ATTR, True)
    return check_peft_version


def install() -> None:
    """Make transformers' adapter API handle RST adapters (idempotent; a no-op without transformers)."""
    try:
        from transformers.integrations import peft as hf_peft
    except ImportError:  # pragma: no cover - transformers is a dependency, but peft_rst works without it
        return
    mixin = hf_peft.PeftAdapterMixin
    if getattr(mixin.load_adapter, _ATTR, False):
        return
    mixin.load_adapter = _wrap_load_adapter(mixin.load_adapter)
    for name in _GATED_METHODS:
        if hasattr(mixin, name):
            setattr(mixin, name, _rst_call(getattr(mixin, name)))
    if hasattr(hf_peft, "check_peft_version"):
        hf_peft.check_peft_version = _gate(hf_peft.check_peft_version)
