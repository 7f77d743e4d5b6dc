"""Save an adapted model for deployment, atomically, with a model card and the CLIP's image processor.

What is saved depends on how the vision tower was trained (``cmkd.apply_peft``): an RST adapter gets
``peft_rst.write_model_card`` (DSP, density, sizes and tau measured from the files), a LoRA / AdaLoRA adapter or a
full / BitFit / linear-probe model gets a short card. The folder is written next to its final place and renamed
into it, so a killed save never leaves a half-written folder under the final name; with the image processor saved
too, it works in ``pipeline("image-classification", model=folder)`` and ``python -m cmkd predict``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .peft_methods import PEFT_SAVED_AS, count_dsp

__all__ = [
    "HubPushError",
    "SavedModel",
    "clean_interrupted_saves",
    "full_model_card",
    "push_adapted_model",
    "push_saved_model",
    "save_adapted_model",
]

# what a killed save leaves: this module's temp / old folders, and the temp files of atomic writes (peft_rst.files)
INTERRUPTED = (".adapter.tmp-*", ".model.tmp-*", ".adapter.old-*", ".model.old-*", ".*.tmp")


@dataclass(frozen=True)
class SavedModel:
    path: Path
    dsp: int  # downstream parameters stored for this task (the paper's DSP)
    nbytes: int  # bytes on disk of the weights (adapter files / model weights)


def full_model_card(fields: dict[str, Any]) -> str:
    """A short card for a model folder (RST adapters get peft_rst's card); ``fields`` as peft_rst's card fields."""
    score = fields.get("accuracy")
    accuracy = "not reported (no target labels)" if score is None else f"{100 * score:.2f} %"
    return (
        f"---\nbase_model: {fields['base_model']}\nlibrary_name: transformers\npipeline_tag: image-classification\n"
        "tags:\n- cmkd\n- unsupervised-domain-adaptation\n---\n\n"
        f"# CMKD-adapted CLIP: {fields['source_domain']} → {fields['target_domain']} ({fields['dataset']})\n\n"
        f"| | |\n|---|---|\n| Base model | `{fields['base_model']}` |\n| Target {fields['metric']} | {accuracy} |\n\n"
        "Load with `AutoModelForImageClassification.from_pretrained(<this folder>)` (`import cmkd` first).\n\n"
        f"{fields['training_notes']}\n"
    )


def save_adapted_model(
    model, folder: str | os.PathLike, peft: str, card_fields: dict[str, Any], image_processor=None
) -> SavedModel:
    """Save ``model`` (trained with ``peft``, one of ``cmkd.PEFT_METHODS``) into ``folder/adapter`` (RST, LoRA,
    AdaLoRA) or ``folder/model`` (the rest), replacing an earlier save only once the new one is complete."""
    from peft_rst.files import atomic_write_text

    folder = Path(folder)
    final = folder / ("adapter" if PEFT_SAVED_AS[peft] == "adapter" else "model")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=folder))
    try:
        if peft == "rst":
            import peft_rst

            model.save_pretrained(tmp, save_embedding_layers=False)
            peft_rst.write_model_card(tmp, **{**card_fields, "repo_id": card_fields.get("repo_id") or str(final)})
            report = peft_rst.report(tmp).adapters[0]
            dsp, nbytes = report.dsp, report.disk_nbytes or 0
        else:
            model.save_pretrained(tmp)
            atomic_write_text(tmp / "README.md", full_model_card(card_fields))
            dsp = sum(p.numel() for p in model.parameters()) if peft == "full" else count_dsp(model, peft)
            nbytes = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
        if image_processor is not None:
            image_processor.save_pretrained(tmp)
        if final.exists():
            os.replace(final, Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=folder)) / final.name)
        os.replace(tmp, final)
    finally:
        for leftover in folder.glob(f".{final.name}.*-*"):
            shutil.rmtree(leftover, ignore_errors=True)
    return SavedModel(final, int(dsp), int(nbytes))


def clean_interrupted_saves(folder: str | os.PathLike) -> list[Path]:
    """Remove what a killed save left in ``folder`` (main process only). Finished files and folders are only ever
    renamed into place, so none of them matches."""
    from accelerate import PartialState

    folder = Path(folder)
    if not folder.is_dir() or not PartialState().is_main_process:
        return []
    removed = [p for pattern in INTERRUPTED for p in folder.glob(pattern)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return removed


def push_saved_model(trainer, folder: str | os.PathLike, repo_id: str, token: str | None = None) -> Any:
    """``trainer.push_to_hub`` of a folder written by :func:`save_adapted_model` (a model or a peft adapter), with
    that folder's card: the trainer saves its model there again and uploads the folder, checkpoints excluded. An
    RST adapter goes with ``peft_rst.push_adapter_to_hub`` instead (adapter, config and card in one commit)."""
    trainer.args = dataclasses.replace(trainer.args, output_dir=str(folder), hub_model_id=repo_id, hub_token=token)
    trainer.model_card = (Path(folder) / "README.md").read_text(encoding="utf-8")
    return trainer.push_to_hub(commit_message="Upload adapted CLIP", token=token)


class HubPushError(RuntimeError):
    """A saved model could not be pushed (network, Hub refusal, bad repo id); it is still saved where it was."""


def push_adapted_model(
    trainer,
    folder: str | os.PathLike,
    method: str,
    repo_id: str,
    card_fields: dict[str, Any],
    token: str | None = None,
) -> str:
    """Push a folder written by :func:`save_adapted_model`: an RST adapter and its card in one commit
    (``peft_rst.push_adapter_to_hub``, from the main process), anything else with :func:`push_saved_model` (every
    process: the Trainer pushes from process zero). A network or Hub failure is a :class:`HubPushError` naming the
    folder and how to upload it by hand; any other error propagates."""
    from accelerate import PartialState
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        if method != "rst":
            push_saved_model(trainer, folder, repo_id, token)
        elif PartialState().is_main_process:
            import peft_rst

            peft_rst.push_adapter_to_hub(folder, repo_id, card_data={**card_fields, "repo_id": repo_id}, token=token)
    except Exception as exc:  # noqa: BLE001 - only network / Hub failures become a HubPushError
        network = type(exc).__module__.startswith(("httpx", "httpcore", "requests", "urllib3"))
        if not (network or isinstance(exc, (OSError, HfHubHTTPError, HFValidationError))):
            raise
        raise HubPushError(
            f"could not push {folder} to {repo_id} on {constants.ENDPOINT}: {type(exc).__name__}: "
            f"{str(exc).strip().rstrip('.')}. The model is saved there: upload the folder with "
            f"`hf upload {repo_id} {folder}`"
        ) from exc
    PartialState().wait_for_everyone()
    return repo_id
