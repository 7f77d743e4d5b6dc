"""Load a pretrained CLIP by Hub id or folder, failing in seconds when it cannot be loaded.

``from_pretrained`` on a Hub id retries with back-off for about a minute before it gives up offline, and ends with a
generic "couldn't connect". :func:`model_source` decides first, with at most one request to the Hub, whether the
model is a local folder, reachable on the Hub, or only in the local cache, and says which flag or setting fixes it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CLIPBundle", "ModelSourceError", "load_clip", "model_source"]

logger = logging.getLogger(__name__)


class ModelSourceError(OSError):
    """A model name that names no loadable CLIP (missing folder, not cached offline, not a dual encoder)."""


def _clause(exc: BaseException) -> str:
    return str(exc).strip().rstrip(".") or type(exc).__name__


def model_source(name: str) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments that load ``name`` (``{"local_files_only": True}`` when the Hub
    cannot be reached but the model is cached), or :class:`ModelSourceError` at once."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise ModelSourceError(
                f"cannot load CLIP {name!r}: it is not a folder; pass a folder saved with save_pretrained or a Hub id"
            )
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"cannot load CLIP {name!r}: the folder has no config.json; it must hold a CLIP saved with "
                "save_pretrained (config.json, weights, tokenizer files)"
            )
        return {}
    try:
        cached = isinstance(try_to_load_from_cache(name, "config.json"), str)
    except (HFValidationError, ValueError) as exc:
        raise ModelSourceError(
            f"cannot load CLIP {name!r}: neither a local folder nor a valid Hub id ({_clause(exc)}); pass a Hub id "
            "such as openai/clip-vit-base-patch16 or a folder"
        ) from exc
    not_cached = (
        f"cannot load CLIP {name!r}: it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); run once "
        "with network access to download it, or pass a local folder"
    )
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise ModelSourceError(f"{not_cached} (offline: HF_HUB_OFFLINE=1)")
        return {}
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", endpoint=constants.ENDPOINT), timeout=10)
    except Exception as exc:  # noqa: BLE001 - an HTTP answer (404, 401) is transformers' to explain
        if isinstance(exc, HfHubHTTPError):
            return {}
        if not cached:
            raise ModelSourceError(
                f"{not_cached} (and {constants.ENDPOINT} cannot be reached: {_clause(exc)})"
            ) from exc
        logger.warning("cannot reach %s (%s); loading %s from the local cache", constants.ENDPOINT, exc, name)
        return {"local_files_only": True}
    return {}


@dataclass
class CLIPBundle:
    """A loaded CLIP checkpoint: the dual encoder, its tokenizer and (if it ships one) its image processor."""

    name: str
    model: Any
    tokenizer: Any
    processor: Any | None

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)


def load_clip(name: str) -> CLIPBundle:
    """Any CLIP dual encoder on the Hub (cached when offline) or in a local ``save_pretrained`` folder."""
    from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

    source = model_source(name)
    try:
        model = AutoModel.from_pretrained(name, **source)
        tokenizer = AutoTokenizer.from_pretrained(name, **source)
    except (OSError, ValueError) as exc:  # missing files / offline Hub; a folder that is not a transformers model
        hint = (
            "the folder must hold a CLIP saved with save_pretrained (config.json, weights, tokenizer files)"
            if Path(name).exists()
            else "without internet the model must already be in the Hugging Face cache (HF_HUB_OFFLINE=1), or pass "
            "a local folder"
        )
        raise ModelSourceError(f"cannot load CLIP {name!r}: {_clause(exc)}. {hint}") from exc
    if not (hasattr(model, "get_text_features") and hasattr(model, "visual_projection")):
        raise ModelSourceError(
            f"{name!r} is a {type(model).__name__}, not a CLIP dual encoder (vision + text tower with projections); "
            "pass a CLIPModel checkpoint such as openai/clip-vit-base-patch16"
        )
    try:
        processor = AutoImageProcessor.from_pretrained(name, **source)
    except (OSError, ValueError):
        processor = None  # CLIP's normalisation is used
    return CLIPBundle(name, model.eval(), tokenizer, processor)
