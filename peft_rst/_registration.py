"""Register RST with peft's mapping tables without editing peft.

peft's `register_peft_method` only accepts names of its closed `PeftType` enum, so RST fills the same four tables
itself with a str-Enum key (accepted upstream, peft issue #2634). Saving and loading go through the tuner-class hooks
that peft 0.21 introduced; older or reshaped peft versions are refused here, at import, rather than failing later
with a confusing error inside `save_pretrained`.

`PeftModel.from_pretrained` / `load_adapter` read `peft_type` from adapter_config.json with peft's
`PeftConfig._get_peft_type` before any RST code runs; for a local file RST puts its config check in front of it, so
an empty, `null` or non-object file, or a mis-cased `"rst"`, is a clear error naming the file instead of a
`JSONDecodeError`, `TypeError` or `KeyError: 'rst'` from inside peft. Valid files are read exactly as before.
"""

from __future__ import annotations

import inspect
import os

import peft
from packaging.version import Version

MIN_PEFT = Version("0.21.0")
_REQUIRED_TUNER_HOOKS = (
    "_get_adapter_state_dict",
    "_remove_adapter_name_from_key",
    "_remap_adapter_state_dict_for_load",
)


class IncompatiblePeftError(ImportError):
    """The installed peft does not offer the extension points RST relies on."""


def check_peft_compatibility() -> None:
    version = Version(peft.__version__)
    hint = "Install a supported release with `pip install 'peft>=0.21,<0.23'`."
    if version < MIN_PEFT:
        raise IncompatiblePeftError(
            f"peft_rst needs peft >= {MIN_PEFT} (tuner-level state-dict hooks), found peft {peft.__version__}. {hint}"
        )
    try:
        from peft import mapping
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError as err:  # pragma: no cover - depends on the installed peft
        raise IncompatiblePeftError(f"peft {peft.__version__} has an unexpected layout ({err}). {hint}") from err
    missing = [
        name
        for name in (
            "PEFT_TYPE_TO_CONFIG_MAPPING",
            "PEFT_TYPE_TO_TUNER_MAPPING",
            "PEFT_TYPE_TO_MIXED_MODEL_MAPPING",
            "PEFT_TYPE_TO_PREFIX_MAPPING",
        )
        if not isinstance(getattr(mapping, name, None), dict)
    ]
    missing += [hook for hook in _REQUIRED_TUNER_HOOKS if not inspect.ismethod(getattr(BaseTuner, hook, None))]
    if missing:
        raise IncompatiblePeftError(
            f"peft {peft.__version__} no longer provides {', '.join(missing)}, which peft_rst registers with or "
            f"overrides. {hint}"
        )


def register_rst() -> None:
    """Idempotently add RST to peft's tables (config class, tuner class, state-dict prefix)."""
    check_peft_compatibility()
    from peft import mapping

    from .config import RSTConfig, RSTPeftType
    from .model import PREFIX, RSTModel

    key = RSTPeftType.RST
    existing = mapping.PEFT_TYPE_TO_TUNER_MAPPING.get(key)
    if existing is not None and existing is not RSTModel:
        raise IncompatiblePeftError(
            f"Another PEFT method is already registered as {key.value!r} ({existing!r}); cannot register RST."
        )
    mapping.PEFT_TYPE_TO_CONFIG_MAPPING[key] = RSTConfig
    mapping.PEFT_TYPE_TO_TUNER_MAPPING[key] = RSTModel
    mapping.PEFT_TYPE_TO_PREFIX_MAPPING[key] = PREFIX
    _guard_peft_type_lookup()

    # transformers' `PreTrainedModel.load_adapter` has its own loader, which cannot read RST's sparse tensors
    from .transformers_integration import install

    install()


def _guard_peft_type_lookup() -> None:
    """Check a local adapter_config.json (see `config.read_config_file`) before peft's `_get_peft_type` reads it."""
    from peft.config import PeftConfigMixin

    original = PeftConfigMixin.__dict__["_get_peft_type"]
    if getattr(original, "_rst_guard", False):
        return
    lookup = original.__func__

    def _get_peft_type(cls, model_id, **hf_hub_download_kwargs):
        from .config import CONFIG_NAME, read_config_file

        if isinstance(model_id, (str, os.PathLike)):
            path = os.path.join(model_id, hf_hub_download_kwargs.get("subfolder") or "", CONFIG_NAME)
            if os.path.isfile(path):
                read_config_file(path)
        return lookup(cls, model_id, **hf_hub_download_kwargs)

    guarded = classmethod(_get_peft_type)
    guarded._rst_guard = True
    PeftConfigMixin._get_peft_type = guarded
