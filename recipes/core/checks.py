"""Checks a recipe runs before it loads any model: cheap inputs first, so a typo costs a second, not a minute.

:func:`check_inputs` looks at what is on disk (data folders / image lists of every task, the output folder); flags,
YAML values, loss settings and a ``--resume_from_checkpoint`` folder are checked when the arguments are parsed
(``runner.parse``). :func:`check_model_source` decides how a ``--model`` can be loaded (local folder, Hub id online,
Hub id from the cache) with at most one request to the Hub, instead of transformers' retry loop with back-off ending
in a generic "couldn't connect".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from .config import ConfigError, RunConfig

__all__ = ["check_inputs", "check_model_source", "check_output_writable", "sentence"]

logger = logging.getLogger(__name__)


def sentence(exc: BaseException | str) -> str:
    """An exception's text as a clause to continue with ". <hint>": stripped, without its final period (library
    messages often end with one; appending another gave "offline-mode'..")."""
    text = str(exc).strip()
    while text.endswith("."):
        text = text[:-1].rstrip()
    return text or type(exc).__name__


# --------------------------------------------------------------------------------------------------------------------
# Model source
# --------------------------------------------------------------------------------------------------------------------


def _is_hub_unreachable(exc: BaseException) -> bool:
    """A failure to talk to the Hub at all (DNS, refused, timeout, dropped connection, sockets disabled), as opposed
    to an HTTP answer (404, 401...) that transformers explains well itself."""
    from huggingface_hub.errors import HfHubHTTPError

    return not isinstance(exc, HfHubHTTPError)


def check_model_source(name: str) -> dict:
    """How to load ``--model name``: the keyword arguments for ``from_pretrained`` (``local_files_only``).

    A local folder must hold a ``config.json``. A Hub id is looked up in the local cache first; offline
    (``HF_HUB_OFFLINE=1``) or when one metadata request to the Hub fails to connect, a cached model loads from the
    cache and a model that is not cached is a :class:`RecipeError` at once.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    from .runner import RecipeError

    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not path.is_dir():
            raise RecipeError(
                f"cannot load CLIP {name!r}: it is not a folder; pass a folder saved with save_pretrained or a Hub id"
            )
        if not (path / "config.json").is_file():
            raise RecipeError(
                f"cannot load CLIP {name!r}: the folder has no config.json; it must hold a CLIP saved with "
                "save_pretrained (config.json, weights, tokenizer files)"
            )
        return {}
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except (HFValidationError, ValueError) as exc:
        raise RecipeError(
            f"cannot load CLIP {name!r}: neither a local folder nor a valid Hub id ({sentence(exc)}); pass a Hub "
            "id such as openai/clip-vit-base-patch16 or a folder"
        ) from exc
    cached = isinstance(cached, str)
    not_cached = (
        f"cannot load CLIP {name!r}: it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); run "
        "once with network access to download it, or pass --model with a local folder"
    )
    if constants.HF_HUB_OFFLINE:
        if not cached:
            raise RecipeError(f"{not_cached} (offline: HF_HUB_OFFLINE=1)")
        return {}
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", endpoint=constants.ENDPOINT), timeout=10)
    except Exception as exc:  # noqa: BLE001 - classified below; anything else is transformers' to explain
        if not _is_hub_unreachable(exc):
            return {}
        if not cached:
            raise RecipeError(f"{not_cached} (and {constants.ENDPOINT} cannot be reached: {sentence(exc)})") from exc
        logger.warning("cannot reach %s (%s); loading %s from the local cache", constants.ENDPOINT, exc, name)
        return {"local_files_only": True}
    return {}


# --------------------------------------------------------------------------------------------------------------------
# Inputs on disk and settings
# --------------------------------------------------------------------------------------------------------------------


def check_output_writable(output_dir: Path) -> None:
    """The output folder (or the nearest folder above it that exists) must accept new files."""
    probe = Path(output_dir).absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"--output_dir {str(output_dir)!r} cannot be created: {probe} is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--output_dir {str(output_dir)!r} cannot be written: no write permission on {probe}")


def _check_task_data(cfg: RunConfig) -> None:
    """Every task's domains exist (folders or image lists), without scanning them."""
    from .data import DataNotFoundError, _domain_root, _find_list_file, _where_to_get

    bench = cfg.benchmark
    if cfg.dataset_id:
        return  # a Hub dataset (or a local datasets folder): datasets.load_dataset explains its own errors
    if cfg.data_dir is not None and not cfg.download and not cfg.data_dir.is_dir():
        raise DataNotFoundError(f"--data_dir {cfg.data_dir} does not exist. {_where_to_get(bench)}")
    if bench.loader == "torchvision":
        return
    splits = {"train"} | ({bench.eval_split} if bench.eval_split != "train" else set())
    keys = sorted({k for task in cfg.tasks for k in task})
    for key in keys:
        spec = bench.domains.get(key)
        if spec is None:  # a target given by --target_* / --eval_* (config.parse names the task after it)
            _check_custom_target(cfg)
            continue
        for split in sorted(splits):
            listed = _find_list_file(bench, spec, split, cfg.data_dir, cfg.image_lists.get(key), cfg.image_list_dir)
            if listed is None and cfg.data_dir is not None:
                _domain_root(bench, spec, cfg.data_dir)


def _check_custom_target(cfg: RunConfig) -> None:
    """The files of --target_dir/--target_list and --eval_dir/--eval_list exist and are of the right kind (a folder,
    a file); the loaders (``recipes.core.unlabeled``) check their contents. A ``--*_dataset_id`` that names no local
    path is left to ``datasets`` (a Hub id), like ``--dataset_id``."""
    from .data import DataNotFoundError
    from .unlabeled import EVAL_FLAGS, TARGET_FLAGS

    given = [(flag, getattr(cfg, flag)) for flag in (*TARGET_FLAGS, *EVAL_FLAGS)]
    given = [(flag, Path(value).expanduser()) for flag, value in given if value]
    if not given:
        raise ConfigError(
            f"target {cfg.tasks[0][1]!r} is not a domain of {cfg.benchmark.display_name}: pass one of its domains "
            "with --target, or give the target images with --target_dir, --target_list or --target_dataset_id"
        )
    for flag, path in given:
        if flag.endswith("_dir") and not path.is_dir():
            what = "is a file, not a folder" if path.exists() else "does not exist"
            raise DataNotFoundError(f"--{flag} {path} {what}; it takes a folder of images")
        if flag.endswith("_list") and not path.is_file():
            what = "is a folder, not a file" if path.exists() else "does not exist"
            raise DataNotFoundError(f"--{flag} {path} {what}; it takes a text file of image paths")
        local = str(path).startswith((".", "/", "~"))
        if flag.endswith("_dataset_id") and local and not path.exists():
            raise DataNotFoundError(f"--{flag} {path} does not exist (a local path; a Hub id has no leading . / ~)")


def check_inputs(cfg: RunConfig) -> None:
    """What can be checked on disk without loading a model: the data of every task and the output folder."""
    _check_task_data(cfg)
    check_output_writable(cfg.output_dir)
