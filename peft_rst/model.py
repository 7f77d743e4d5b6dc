"""`RSTModel`: the peft tuner that injects RST layers, runs the reset hook and saves sparse adapters."""

from __future__ import annotations

import difflib
import os
import re
import warnings
import weakref
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTuner, _extend_unique, _get_submodules
from peft.utils import AuxiliaryTrainingWrapper
from peft.utils.other import set_additional_trainable_modules
from torch import nn

from . import format as rst_format
from .config import RSTConfig
from .layer import RSTLayer, SparseEntries
from .loading import ModelSnapshot, as_in_file, current_load_call
from .reset import ResetGroup, current_plan, register, unregister
from .reset_plan import FlatAllocator, _allocatable, packs_in_place
from .switch_plan import SwitchPlan

PREFIX = "rst_"
_CONTAINER = "rst_weight"


class BaseWeightsMismatchError(ValueError):
    """The adapter was trained from other base weights than the model it is being loaded onto."""


def _matches(patterns, key: str) -> bool:
    """peft's matching rule: a regex string must match the whole name; a list entry the name or its suffix."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, key) is not None
    return any(key == p or key.endswith(f".{p}") for p in patterns)


def _under(key: str, roots: set[str]) -> bool:
    """Whether `key` is one of `roots` or lies below one ("" is the whole model); O(depth), not O(len(roots))."""
    if "" in roots:
        return True
    while key:
        if key in roots:
            return True
        key = key.rpartition(".")[0]
    return False


_INTERNAL = re.compile(r"(^|\.)(base_layer|rst_weight|rst_sparse|modules_to_save|original_module)(\.|$)")


def check_names_exist(config: RSTConfig, model: nn.Module) -> None:
    """Every entry of target_modules / exclude_modules / modules_to_save must match a module of `model`.

    peft only refuses a target list that matches nothing at all, and lets a `modules_to_save` name that matches
    nothing pass silently (the head then stays frozen and is not saved): a typo, or a head called `classifier`
    (Hugging Face ViT/BERT classifiers) rather than `head`, must be an error that says which names exist.
    """
    if config.target_modules is None and config.exclude_modules is None and not config.modules_to_save:
        return
    names = [name for name, _ in model.named_modules() if name]
    fields = (
        ("target_modules", config.target_modules, lambda name, p: name == p or name.endswith(f".{p}")),
        ("exclude_modules", config.exclude_modules, lambda name, p: name == p or name.endswith(f".{p}")),
        ("modules_to_save", config.modules_to_save, lambda name, p: name.endswith(p)),  # peft's _set_trainable
    )
    for field_name, patterns, rule in fields:
        if patterns is None:
            continue
        if isinstance(patterns, str):
            regex = re.compile(patterns)
            if not any(regex.fullmatch(name) for name in names):
                raise ValueError(
                    f"RSTConfig.{field_name}={patterns!r} (a regex, matched against whole module names) matches no "
                    f"module of this {type(model).__name__}. {_nearby_names(patterns, names)}"
                )
            continue
        for entry in sorted(patterns):
            if not any(rule(name, entry) for name in names):
                raise ValueError(
                    f"RSTConfig.{field_name} entry {entry!r} matches no module of this {type(model).__name__}. "
                    f"{_nearby_names(entry, names)}"
                )


def _nearby_names(entry: str, names: list[str]) -> str:
    """Real module names close to `entry`, and the model's last modules (where a task head usually is)."""
    own = [name for name in names if not _INTERNAL.search(name)]
    candidates = sorted({name.rpartition(".")[2] for name in own} | set(own))
    close = difflib.get_close_matches(entry, candidates, n=5, cutoff=0.5)
    last = [name for name in own if "." not in name][-3:]
    hint = f"Similar names: {', '.join(close)}. " if close else ""
    return (
        f"{hint}The model's top-level modules end with: {', '.join(last)}. Check the names with "
        "`[n for n, _ in model.named_modules()]`."
    )


def resolve_parameter_owners(config: RSTConfig, model: nn.Module) -> list[str]:
    """Current names of the modules whose own parameters this config targets (wrappers for wrapped modules).

    Targeting a module means all parameters below it; None means the whole model. `modules_to_save` and
    `exclude_modules` subtrees are left out, and so are adapter internals of earlier adapters.
    """
    names = [name for name, _ in model.named_modules()]
    skip_roots: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) or _matches(config.modules_to_save, name):
            skip_roots.add(name)
        if _matches(config.exclude_modules, name):
            skip_roots.add(name)
        if isinstance(module, RSTLayer):
            skip_roots.add(f"{name}.{_CONTAINER}" if name else _CONTAINER)
    skip_roots.discard("")
    if config.target_modules is None:
        roots = {""}
    else:
        roots = {name for name in names if name and _matches(config.target_modules, name)}
    owners = []
    for name, module in model.named_modules():
        if not _under(name, roots) or _under(name, skip_roots):
            continue
        if not any(True for _ in module.named_parameters(recurse=False)):
            continue
        # the parameters of an already wrapped module live on its base_layer: target the wrapper
        owner = name.removesuffix(".base_layer") if name.endswith(".base_layer") else name
        if owner in ("", "base_layer"):
            params = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            raise ValueError(
                f"The top-level module {type(model).__name__} owns parameters directly ({params}); peft cannot wrap "
                "the top-level module. Wrap the submodule that should be adapted (e.g. the vision tower), register "
                "frozen scalars as buffers, or list the owning module in `modules_to_save`."
            )
        owners.append(owner)
    return owners


class RSTModel(BaseTuner):
    """Residual Sparse Training (paper Sec. III.C) as a peft tuner.

    Example:
        ```py
        >>> import peft_rst  # registers RST with peft
        >>> from peft import get_peft_model
        >>> model = get_peft_model(vision_tower, peft_rst.RSTConfig(tau=1e-6, modules_to_save=["head"]))
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = RSTLayer
    target_module_mapping: dict = {}

    def __init__(self, model, config, adapter_name, low_cpu_mem_usage: bool = False, state_dict=None) -> None:
        self._owner_keys: set[str] = set()
        self._reset_groups: dict[str, ResetGroup] = {}
        super().__init__(model, config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # ------------------------------------------------------------------ injection
    def _prepare_adapter_config(self, peft_config: RSTConfig, model_config: dict) -> RSTConfig:
        return peft_config  # target_modules=None means "everything", no per-architecture defaults needed

    def _prepare_model(self, peft_config: RSTConfig, model: nn.Module) -> None:
        check_names_exist(peft_config, model)
        owners = resolve_parameter_owners(peft_config, model)
        if not owners:
            raise ValueError(
                f"RSTConfig(target_modules={peft_config.target_modules!r}, exclude_modules="
                f"{peft_config.exclude_modules!r}, modules_to_save={peft_config.modules_to_save!r}) matches no module "
                "that owns parameters in this model. Check the names with `[n for n, _ in model.named_modules()]`."
            )
        self._owner_keys = set(owners)
        self._shared_weights: dict[int, nn.Parameter] = {}  # id(w0) -> W for tied parameters, per injection
        self._allocator = None if peft_config.inference_mode else FlatAllocator(_w_sizes(model, owners))

    def _take(self, base: torch.Tensor) -> torch.Tensor | None:
        """Storage for the W of `base` in this injection's flat buffers (see `reset_plan.FlatAllocator`)."""
        allocator = self.__dict__.get("_allocator")
        return allocator.take(base) if allocator is not None else None

    def _check_target_module_exists(self, peft_config: RSTConfig, key: str) -> bool:
        return key in self._owner_keys

    def _create_and_replace(
        self, peft_config, adapter_name, target, target_name, parent, current_key, parameter_name=None
    ) -> None:
        if isinstance(target, RSTLayer):
            target.update_layer(adapter_name, peft_config, self._shared_weights, self._take)
            # nested wrappers below this one are skipped by peft's injection loop: add the adapter to them here
            for name, module in target.base_layer.named_modules(prefix=f"{current_key}.base_layer"):
                if isinstance(module, RSTLayer) and name in self._owner_keys:
                    module.update_layer(adapter_name, peft_config, self._shared_weights, self._take)
            return
        new_module = RSTLayer(target, adapter_name, peft_config, shared=self._shared_weights, allocate=self._take)
        if adapter_name not in self.active_adapters:
            new_module.set_adapter(self.active_adapters)  # a freshly added adapter is not trainable until set
        real_parent = parent.get_base_layer() if isinstance(parent, RSTLayer) else parent
        setattr(real_parent, target_name, new_module)

    def inject_adapter(
        self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False, state_dict=None
    ):
        """peft's injection as a transaction: any error leaves `model` exactly as it was.

        Within `PeftModel.from_pretrained` / `load_adapter` of a local folder, the adapter file is read and checked
        against the freshly injected layers here, before peft reads it again and copies anything: an unreadable,
        corrupted or mismatched file is refused with the model unchanged (peft's own steps between injection and
        loading, e.g. its `modules_to_save` key mapping, would otherwise fail half-way). For other loads (a Hub id)
        the snapshot is kept until `_remap_adapter_state_dict_for_load` has checked the file.
        """
        self.__dict__["_switch_cache"] = None  # see set_adapter
        snapshot = ModelSnapshot(self)
        snapshot.forget(self.peft_config, adapter_name)  # peft registers the new adapter's config before injecting
        call = current_load_call()
        try:
            if state_dict is not None or not self._add_inference_adapter_to_existing_layers(model, adapter_name):
                # RST applies exclude_modules itself (resolve_parameter_owners), so peft's "no modules were excluded"
                # warning is always wrong here; names that match nothing are errors (check_names_exist)
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=r"You have passed exclude_modules=.*no modules were")
                    super().inject_adapter(
                        model,
                        adapter_name,
                        autocast_adapter_dtype=autocast_adapter_dtype,
                        low_cpu_mem_usage=low_cpu_mem_usage,
                        state_dict=state_dict,
                    )
            self._end_injection()
            self._register_reset(adapter_name)  # also for adapters added after construction (add/load_adapter)
            if call is not None and call.adapter_name == adapter_name and call.local_folder is not None:
                self._check_file(model, adapter_name, call.local_folder)
        except BaseException:
            snapshot.restore()
            self._end_injection()
            raise
        self._pending_load = (
            (adapter_name, call, snapshot) if call is not None and call.adapter_name == adapter_name else None
        )

    def _end_injection(self) -> None:
        """Drop what only the injection needed. The W made hold the allocator's buffer; the rest of it is not needed.
        The tied-weight map holds every W it made: kept, it would keep the original W alive after FSDP2's
        `fully_shard` replaced them by their shards (a full copy of W on every rank for the model's lifetime)."""
        self.__dict__["_allocator"] = None
        self.__dict__["_shared_weights"] = {}

    def _check_file(self, model: nn.Module, adapter_name: str, folder: str) -> None:
        """Check the adapter file in `folder` from its safetensors header: readable, keys and shapes fit the model.

        This reads no tensor data (peft reads the file next); the checksums, the decoding and the base fingerprints
        are checked in `_remap_adapter_state_dict_for_load` before anything is written, under the same snapshot.
        """
        from safetensors import safe_open

        path = os.path.join(folder, "adapter_model.safetensors")
        if not os.path.isfile(path):
            if os.path.isfile(os.path.join(folder, "adapter_model.bin")):
                return  # a pickled checkpoint: nothing to read cheaply; _remap checks it
            raise FileNotFoundError(
                f"'{folder}' has no adapter_model.safetensors: the adapter weights are missing. Save the adapter "
                "again with `model.save_pretrained(folder)`, or copy the file next to its adapter_config.json."
            )
        try:
            with safe_open(path, framework="pt") as f:  # parses and validates the header against the file size
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
        except Exception as err:  # safetensors raises its own SafetensorError for a bad header or size
            raise rst_format.RSTFormatError(
                f"'{path}' cannot be read ({type(err).__name__}: {err}): the file is truncated or corrupted; "
                "re-save the adapter from the trained model, or re-download the file if it was copied."
            ) from err
        self._check_keys(model, self.peft_config[adapter_name], adapter_name, shapes, f"'{path}'")

    def _take_pending_load(self, adapter_name: str) -> ModelSnapshot | None:
        """The snapshot taken when this load injected `adapter_name`, if the load is still the one running."""
        pending, self._pending_load = getattr(self, "_pending_load", None), None
        if pending is None or pending[0] != adapter_name or not pending[1].is_active():
            return None
        return pending[2]

    def _add_inference_adapter_to_existing_layers(self, model: nn.Module, adapter_name: str) -> bool:
        """Fast path of `load_adapter` for one more domain patch: add an inference adapter to the RST layers in place.

        Applies when the new adapter is loaded for inference and every module it targets is an RST layer already
        (the deployment case: N domain patches of one base). The result is what peft's generic injection gives
        (same layers, targeted names, requires_grad flags, modules_to_save wrappers; tested side by side), without
        its module-by-module matching, which costs more than reading and decoding the adapter itself. Returns
        False, changing nothing, when the generic path is needed.
        """
        config = self.peft_config[adapter_name]
        if not config.inference_mode or getattr(config, "modules_to_tie", None):
            return False
        check_names_exist(config, model)
        owners = resolve_parameter_owners(config, model)
        layers = [model.get_submodule(name) for name in owners]
        if not layers or not all(isinstance(layer, RSTLayer) for layer in layers):
            return False
        self._check_new_adapter_config(config)
        self._check_tied_modules(model, config)
        # like peft's injection: parameters that exist already keep their requires_grad flags exactly
        flags = [(p, p.requires_grad) for p in model.parameters()]
        for layer in layers:
            layer.update_layer(adapter_name, config)
        _extend_unique(self.targeted_module_names, [name.replace(".base_layer.", ".") for name in owners])
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        return True

    def _register_reset(self, adapter_name: str) -> None:
        old = self._reset_groups.pop(adapter_name, None)
        if old is not None:
            unregister(old)
        group = ResetGroup(self.peft_config[adapter_name], adapter_name)
        group.layers = [m for m in self.model.modules() if isinstance(m, RSTLayer) and adapter_name in m.rst_weight]
        self._reset_groups[adapter_name] = group
        # the registry holds groups weakly; the layers keep theirs alive too, because peft's
        # `inject_adapter_in_model` (transformers' add_adapter / load_adapter) drops the tuner right away
        for layer in group.layers:
            layer._reset_groups[adapter_name] = group
        register(group)
        # W that the plan has to move into its flat buffer move now, while only w0 and W exist: at the first
        # optimizer step the gradients and optimizer state would be held too, and the move (a second copy of W for a
        # moment) would raise the peak memory of training. W made in the buffer (the usual case) need no move: their
        # plan is built at the first step, on the tensors the model holds then. Built now, it would keep the
        # unsharded W and w0 alive through the first step after FSDP2's `fully_shard` replaced them by shards.
        if not packs_in_place(group.targets()):
            current_plan(group)

    # ------------------------------------------------------------------ adapters
    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """peft's `set_adapter` over the adapter modules found once, not over every module of the model per call.

        Switching domains is the deployment hot path; peft walks the whole module tree twice per switch (its
        auxiliary modules, then its tuner layers), which costs more than writing the entries. The module lists are
        rebuilt after every injection or deletion, the only peft steps that add or remove adapter modules.
        """
        layers, wrappers = self._switch_modules()
        for module in wrappers:  # as peft.utils.other._set_adapter
            name = module.check_set_adapter(adapter_name)
            module.set_adapter(name if name in module._adapters else [], inference_mode=inference_mode)
        if self._switch_with_plan(layers, adapter_name):
            self.active_adapter = adapter_name
            return
        for layer in layers:  # as peft.tuners.tuners_utils.set_adapter
            if layer.merged:
                warnings.warn(
                    "Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2
                )
                layer.unmerge()
            layer.set_adapter(adapter_name, inference_mode=inference_mode)
        self.active_adapter = adapter_name

    def _switch_with_plan(self, layers: list[RSTLayer], adapter_name: str | list[str]) -> bool:
        """Switch inference adapters through a `SwitchPlan` (a few tensor ops for the whole model), if it applies.

        It applies when the layers hold inference adapters only; the plan lays the base parameters out in flat
        buffers the first time (see `peft_rst.switch_plan`). Returns False, changing nothing, otherwise.
        """
        plan = self.__dict__.get("_switch_plan")
        if plan is None or not plan.valid(layers):
            if not any(len(layer._modules["rst_sparse"]) for layer in layers):
                return False
            if any(layer._modules["rst_weight"]._modules for layer in layers):
                return False  # trainable adapters: the reset plan owns the layout of W; switch layer by layer
            plan = self.__dict__["_switch_plan"] = SwitchPlan.build(layers, plan)
            if plan is None:
                return False
        return plan.switch([adapter_name] if isinstance(adapter_name, str) else list(adapter_name))

    def loaded_adapter_nbytes(self, adapter_name: str) -> int:
        """Memory an inference adapter holds: its changed entries in the layers, plus their compiled copy in the
        switch plan (made at the first switch after loading; see `peft_rst.switch_plan`). For sizing how many
        domains fit next to one base model; modules_to_save copies are not counted."""
        sparse = [layer._modules["rst_sparse"] for layer in self._switch_modules()[0]]
        held = [s.nbytes(adapter_name) for s in sparse if adapter_name in s]
        if not held:
            loaded = sorted({name for s in sparse for name in s.keys()})
            raise ValueError(
                f"{adapter_name!r} is not a loaded inference adapter (loaded: {loaded}); load it with "
                "load_adapter(path, adapter_name) first. Trainable adapters hold a dense W per parameter."
            )
        plan = self.__dict__.get("_switch_plan")
        return sum(held) + (plan.nbytes(adapter_name) if plan is not None else 0)

    def _switch_modules(self) -> tuple[list[RSTLayer], list[AuxiliaryTrainingWrapper]]:
        cached = self.__dict__.get("_switch_cache")
        if cached is None:
            modules = list(self.model.modules())
            cached = (
                [m for m in modules if isinstance(m, RSTLayer)],
                [m for m in modules if isinstance(m, AuxiliaryTrainingWrapper)],
            )
            self.__dict__["_switch_cache"] = cached
        return cached

    def reset_step(self, adapter_name: str | None = None) -> int:
        """Optimizer steps seen by the reset schedule of `adapter_name` (default: the active adapter)."""
        return self._reset_group(adapter_name).step

    def set_reset_step(self, step: int, adapter_name: str | None = None) -> None:
        """Restore the schedule position when resuming training from a checkpoint."""
        self._reset_group(adapter_name).step = int(step)

    def _reset_group(self, adapter_name: str | None) -> ResetGroup:
        name = adapter_name or self.active_adapters[0]
        if name not in self.peft_config or name not in self._reset_groups:  # deleted adapters keep no schedule
            known = sorted(set(self._reset_groups) & set(self.peft_config))
            raise KeyError(f"Adapter '{name}' has no reset schedule; adapters with one: {known}")
        return self._reset_groups[name]

    # ------------------------------------------------------------------ unloading
    def _replace_module(self, parent, child_name, new_module, child) -> None:
        """Plain replacement: RST layers create W on the base's device already, and a `modules_to_save` module
        need not have a `.weight` (BaseTuner's default copies one over)."""
        setattr(parent, child_name, new_module)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge:
            self._check_merge_allowed()
        self.__dict__["_switch_cache"] = None
        layers = [(key, m) for key, m in self.model.named_modules() if isinstance(m, RSTLayer)]
        for key, layer in reversed(layers):  # innermost first, so that outer keys stay valid
            if merge:
                layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
            else:
                layer.restore_base_weights()  # an active inference adapter is written into the base
            parent, _, target_name = _get_submodules(self.model, key)
            real_parent = parent.get_base_layer() if isinstance(parent, RSTLayer) else parent
            setattr(real_parent, target_name, layer.get_base_layer())
        for group in self._reset_groups.values():
            unregister(group)
        self._reset_groups.clear()
        return super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )

    # ------------------------------------------------------------------ saving and loading
    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f".{_CONTAINER}.{adapter_name}."
        if marker in key:
            head, _, tail = key.rpartition(marker)
            return f"{head}.{_CONTAINER}.{tail}"
        return super()._remove_adapter_name_from_key(key, adapter_name)

    @staticmethod
    def _rst_entries(model: nn.Module, adapter_name: str, restore: bool = True):
        """(layer, state-dict key of W, parameter name, base) for every parameter adapter `adapter_name` covers.

        The key is the one a trainable adapter's W has; inference adapters are saved under the same key so that a
        checkpoint does not depend on how the adapter was held in memory. With `restore`, the base holds w0
        (an active inference adapter is taken out first); without, it may hold a patched-in adapter.
        """
        for module_name, module in model.named_modules():
            if not isinstance(module, RSTLayer):
                continue
            if adapter_name not in module.rst_weight and adapter_name not in module.rst_sparse:
                continue
            if restore:
                module.restore_base_weights()
            module_name = module_name.removeprefix("_fsdp_wrapped_module.")
            for param_name, base in module.get_base_layer().named_parameters(recurse=False):
                key = f"{module_name}.{_CONTAINER}.{adapter_name}.{param_name}"
                yield module, key, param_name, base

    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """Replace every dense W by its changed entries (sparse, see `peft_rst.format`)."""
        result = {}
        for layer, key, param_name, base in cls._rst_entries(model, adapter_name):
            if adapter_name in layer.rst_sparse:
                entries = layer.rst_sparse[adapter_name].get(param_name)
                if entries is None:
                    raise RuntimeError(
                        f"Inference adapter '{adapter_name}' was created but never loaded ({key} has no entries); "
                        "load it with PeftModel.from_pretrained / load_adapter before saving it."
                    )
                parts = entries.parts()
            else:
                # prefer the state_dict's tensors: under FSDP / DeepSpeed they are the gathered full weights
                dense = state_dict.get(key, layer.rst_weight[adapter_name][param_name]).detach()
                if _is_sharded(base):  # FSDP2: the module holds a shard, a gathered state_dict the full w0
                    base = state_dict.get(key.replace(f".{_CONTAINER}.{adapter_name}.", ".base_layer."), base)
                if _is_sharded(dense) or _is_sharded(base):
                    raise ValueError(
                        f"{key} is sharded (FSDP2 DTensor): pass the gathered weights, e.g. `save_pretrained(path, "
                        "state_dict=get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, "
                        "cpu_offload=True)))` from torch.distributed.checkpoint.state_dict, on the main process."
                    )
                flat = dense.reshape(-1)
                indices = torch.nonzero(flat != base.detach().reshape(-1).to(flat.dtype), as_tuple=True)[0]
                parts = rst_format.encode_sparse(
                    indices.cpu(), flat[indices].cpu(), flat.numel(), base_fingerprint(base)
                )
            for suffix, tensor in parts.items():
                result[f"{key}.{suffix}"] = tensor
        # the tensors peft adds next (modules_to_save), taken the way peft takes them, so that the integrity record
        # covers every tensor of the file (format version 2)
        written = {cls._remove_adapter_name_from_key(k, adapter_name): v for k, v in result.items()}
        for name, module in model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                name = name.removeprefix("_fsdp_wrapped_module.")
                own = {k.removeprefix(f"{name}."): v for k, v in state_dict.items() if k.startswith(f"{name}.")}
                for k, v in module.adapter_state_dict(adapter_name, own).items():
                    written[cls._remove_adapter_name_from_key(f"{name}.{k}", adapter_name)] = v
        result[rst_format.INTEGRITY_KEY] = rst_format.integrity_record(written)
        return result

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Map saved sparse entries onto the adapter's storage, after checking the whole file against the model.

        Trainable adapters get dense W = w0 patched with the entries (so training resumes measuring distance from
        the pretrained weights); inference adapters keep the encoded parts as they are. Nothing is written before
        every check has passed; if anything fails, the model is put back as it was before the load began (for a
        load that injected a new adapter: before the injection), and an adapter loaded under an existing name keeps
        its previous weights.
        """
        raw, tuner = _raw_model(model)
        pending = tuner._take_pending_load(adapter_name) if tuner is not None else None
        snapshot = pending or ModelSnapshot(model)
        try:
            return cls._remap_checked(model, raw, config, adapter_name, state_dict)
        except BaseException:
            snapshot.restore()
            raise

    @classmethod
    def _remap_checked(cls, model, raw, config, adapter_name, state_dict):
        prefix = _PEFT_PREFIX if raw is not model else ""
        # the file's keys as saved: peft's prefix dropped, its `modules_to_save` key renaming undone
        renamed = _wrapper_key_map(raw, adapter_name)
        saved_to_given: dict[str, str] = {}
        for key in state_dict:
            bare = key.removeprefix(_PEFT_PREFIX)
            saved_to_given[key[: len(key) - len(bare)] + renamed.get(bare, bare)] = key
        saved = {k: state_dict[g] for k, g in saved_to_given.items()}
        decoded = cls._check_checkpoint(
            raw, config, adapter_name, saved, f"adapter '{adapter_name}'", in_file=as_in_file(saved)
        )
        consumed = {f"{d.checkpoint_key}.{s}" for d in decoded for s in rst_format.SUFFIXES}
        consumed.add(rst_format.INTEGRITY_KEY)
        result = {g: state_dict[g] for k, g in saved_to_given.items() if k.removeprefix(_PEFT_PREFIX) not in consumed}
        sparse: dict[RSTLayer, dict[str, SparseEntries]] = {}
        for d in decoded:
            if adapter_name in d.layer.rst_sparse:
                # inference adapters are installed here, not through load_state_dict: their entries are not
                # module state (see SparseAdapters), and every check above has passed
                sparse.setdefault(d.layer, {})[d.param_name] = SparseEntries.from_data(d.data, d.base.device)
                continue
            d.layer.restore_base_weights()
            weight = d.layer.rst_weight[adapter_name][d.param_name]
            dense = d.base.detach().to(dtype=weight.dtype, copy=True).reshape(-1)
            dense[d.data.indices.to(dense.device)] = d.data.values.to(device=dense.device, dtype=dense.dtype)
            result[prefix + d.model_key] = dense.view(d.base.shape)
        for layer, entries in sparse.items():
            layer.load_sparse(adapter_name, entries)
        return result

    @classmethod
    def _check_keys(cls, raw, config, adapter_name: str, shapes: dict, source: str) -> list[tuple]:
        """Check a checkpoint's keys and shapes (as in the file: readable from its header alone) against the model.

        Every targeted parameter must have its entries, every `modules_to_save` module its tensors with the model's
        shapes, and nothing else may be in the file: entries the config does not target (e.g. after editing
        target_modules in adapter_config.json) would otherwise be dropped silently. Returns, per targeted
        parameter, (layer, model key, checkpoint key, parameter name, base, the parts' keys as in `shapes`).
        """
        record = rst_format.integrity_key(shapes, source)
        left = {k.removeprefix(_PEFT_PREFIX): k for k in shapes if k != record}
        entries = []
        for layer, model_key, param_name, base in cls._rst_entries(raw, adapter_name, restore=False):
            checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
            parts = {
                s: left.pop(f"{checkpoint_key}.{s}") for s in rst_format.SUFFIXES if f"{checkpoint_key}.{s}" in left
            }
            if not parts:
                raise ValueError(
                    f"{source}: the adapter checkpoint has no entry for '{checkpoint_key}'. It was saved from another "
                    "model or another PEFT method, or with different target_modules; load it onto the base model it "
                    "was trained on, with its own adapter_config.json."
                )
            entries.append((layer, model_key, checkpoint_key, param_name, base, parts))
        if not entries:
            raise ValueError(f"Adapter '{adapter_name}' has no RST layers in this model; nothing to load.")
        missing = []
        for name, module in raw.named_modules():
            if not isinstance(module, AuxiliaryTrainingWrapper):
                continue
            key_map = module.adapter_state_dict_load_map(adapter_name)
            name = name.removeprefix("_fsdp_wrapped_module.")
            model_tensors = module.state_dict(keep_vars=True) if key_map else {}
            for key, store in key_map.items():
                given = left.pop(f"{name}.{key}", None)
                if given is None:
                    missing.append(f"{name}.{key}")
                elif store in model_tensors and tuple(shapes[given]) != tuple(model_tensors[store].shape):
                    raise ValueError(
                        f"{source}: '{name}.{key}' has shape {tuple(shapes[given])} in the checkpoint but "
                        f"{tuple(model_tensors[store].shape)} in the model: the module was saved from another "
                        "architecture (e.g. a head with another number of classes)."
                    )
        if missing:
            raise ValueError(
                f"{source}: modules_to_save={config.modules_to_save} expects {len(missing)} tensors "
                f"the checkpoint lacks (first: '{missing[0]}'). adapter_config.json must list the modules_to_save "
                "the adapter was saved with."
            )
        if left:
            names = sorted(left)
            raise ValueError(
                f"{source}: the checkpoint holds {len(names)} entries that the adapter config does not target "
                f"(first: {', '.join(names[:3])}). Loading would drop them silently: restore target_modules / "
                "exclude_modules / modules_to_save in adapter_config.json to the values the adapter was saved with."
            )
        return entries

    @classmethod
    def _check_checkpoint(
        cls, raw, config, adapter_name: str, saved: dict, source: str, in_file: dict | None = None
    ) -> list[_Decoded]:
        """Check a checkpoint (keys as peft saved them) against the model; change nothing visible.

        On top of `_check_keys`: every tensor must pass the file's checksums (`in_file`: the same tensors under the
        keys the file has, when a loader renamed them, see `loading.HandedFile`), and every parameter's entries
        must decode to this parameter's size and (unless disabled) come from these base weights (fingerprint).
        """
        rst_format.check_integrity(saved if in_file is None else in_file, source)
        shapes = {k: tuple(v.shape) for k, v in saved.items()}
        decoded = []
        for layer, model_key, checkpoint_key, param_name, base, keys in cls._check_keys(
            raw, config, adapter_name, shapes, source
        ):
            parts = {suffix: saved[key] for suffix, key in keys.items()}
            # validates the encoding and that the saved tensor has this parameter's size
            data = rst_format.decode_sparse(parts, base.numel(), checkpoint_key)
            decoded.append(_Decoded(layer, model_key, checkpoint_key, param_name, base, data))
        if config.check_base_fingerprint:
            mismatched = [d for d in decoded if d.data.base_fingerprint != _w0_fingerprint(d.layer, d.base)]
            if mismatched:
                names = ", ".join(d.checkpoint_key for d in mismatched[:3])
                raise BaseWeightsMismatchError(
                    f"{len(mismatched)} of {len(decoded)} adapter tensors were trained from different base weights "
                    f"than this model's (first: {names}). Load the adapter onto the checkpoint it was trained from, "
                    "or, to load it anyway: `cfg = PeftConfig.from_pretrained(path); cfg.check_base_fingerprint = "
                    "False; PeftModel.from_pretrained(model, path, config=cfg)`."
                )
        return decoded


def _w_sizes(model: nn.Module, owners: list[str]) -> dict[torch.dtype, int]:
    """Entries per dtype of the base parameters whose W the injection will make (each tied tensor once)."""
    sizes: dict[torch.dtype, int] = {}
    seen: set[int] = set()
    for name in owners:
        module = model.get_submodule(name)
        if isinstance(module, RSTLayer):
            module = module.get_base_layer()
        for p in module._parameters.values():
            if p is not None and id(p) not in seen and _allocatable(p):
                seen.add(id(p))
                sizes[p.dtype] = sizes.get(p.dtype, 0) + p.numel()
    return sizes


def _is_sharded(tensor: torch.Tensor) -> bool:
    return type(tensor).__name__ == "DTensor"


@dataclass(frozen=True)
class _Decoded:
    layer: RSTLayer
    model_key: str  # key of W in the raw model's state dict (trainable adapters)
    checkpoint_key: str  # the same key as saved (no adapter name)
    param_name: str
    base: torch.Tensor
    data: rst_format.SparseTensorData


def _raw_model(model: nn.Module):
    """(the wrapped model, the RSTModel tuner or None) behind a PeftModel, a tuner or a model with injected layers."""
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, RSTModel):
        return tuner.model, tuner
    if isinstance(model, RSTModel):
        return model.model, model
    return model, None


def _wrapper_key_map(raw: nn.Module, adapter_name: str) -> dict[str, str]:
    """Key in the model -> key as saved, for what peft's `set_peft_model_state_dict` renames (modules_to_save)."""
    renamed = {}
    for name, module in raw.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper):
            name = name.removeprefix("_fsdp_wrapped_module.")
            for key, store in module.adapter_state_dict_load_map(adapter_name).items():
                renamed[f"{name}.{store}"] = f"{name}.{key}"
    return renamed


_PEFT_PREFIX = "base_model.model."
# id(tensor) -> (weakref, version, fingerprint): loading N adapters onto one base fingerprints each tensor once
_fingerprints: dict[int, tuple[weakref.ref, int, int]] = {}


def _w0_fingerprint(layer: RSTLayer, base: torch.Tensor) -> int:
    """Fingerprint of w0 of `base`, owned by `layer`: from the cache, else computed with the layer's patch taken out.

    Patching writes through `.data` and leaves the tensor's version alone, so a cached value (always computed on
    w0) stays valid while an inference adapter is patched in.
    """
    cached = _cached_fingerprint(base)
    if cached is not None:
        return cached
    layer.restore_base_weights()
    return base_fingerprint(base)


def _cached_fingerprint(base: torch.Tensor) -> int | None:
    cached = _fingerprints.get(id(base))
    if cached is not None and cached[0]() is base and cached[1] == base.detach()._version:
        return cached[2]
    return None


def base_fingerprint(base: torch.Tensor) -> int:
    """`format.tensor_fingerprint` of a base parameter, cached until the tensor is modified in place."""
    cached = _cached_fingerprint(base)
    if cached is not None:
        return cached
    data = base.detach()
    value = rst_format.tensor_fingerprint(data)
    _fingerprints[id(base)] = (weakref.ref(base), data._version, value)
    return value
