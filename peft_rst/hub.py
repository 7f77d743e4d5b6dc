"""Push an RST adapter to the Hugging Face Hub with its model card, in one commit.

`PeftModel.from_pretrained(base, repo_id)` loads it back (after `import peft_rst`). The upload goes through
`HfApi.create_repo` and `HfApi.create_commit` with one `CommitOperationAdd` per file, so exactly the adapter, its
config and the rendered card are sent, whatever else lies in a local folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .model_card import CARD_NAME, write_model_card
from .report import ADAPTER_FILES, CONFIG_NAME, WEIGHTS_NAME

__all__ = ["HubTokenError", "push_adapter_to_hub"]


class HubTokenError(RuntimeError):
    """No Hugging Face token is available for an upload."""


def push_adapter_to_hub(
    peft_model_or_folder: Any,
    repo_id: str,
    *,
    card_data: dict[str, Any] | None = None,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload RST adapter",
    adapter_name: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
    template_path: str | os.PathLike | None = None,
):
    """Upload an RST adapter (a live PeftModel or a folder saved by `save_pretrained`) and its model card.

    `card_data` holds the card fields (`peft_rst.model_card.CARD_FIELDS`: source_domain, target_domain, accuracy,
    dataset, base_model...); DSP, density, size and tau are measured from the adapter. `adapter_name` picks the
    adapter of a live model (default: the active one); it is uploaded as the repo's default adapter. `endpoint`
    targets another Hub deployment (default: HF_ENDPOINT). Returns huggingface_hub's `CommitInfo`.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    token = token or get_token()
    if not token:
        raise HubTokenError(
            f"No Hugging Face token found to push '{repo_id}': pass token=..., set the HF_TOKEN environment "
            "variable, or log in once with `hf auth login`. The token needs write access."
        )
    card_data = dict(card_data or {})
    if card_data.setdefault("repo_id", repo_id) != repo_id:
        raise ValueError(f"card_data['repo_id']={card_data['repo_id']!r} differs from repo_id={repo_id!r}.")

    with tempfile.TemporaryDirectory(prefix="rst-push-") as tmp:
        folder = _stage_adapter(peft_model_or_folder, Path(tmp), adapter_name)
        write_model_card(folder, template_path, **card_data)
        api = HfApi(endpoint=endpoint, token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
            for name in (*ADAPTER_FILES, CARD_NAME)
        ]
        return api.create_commit(repo_id, operations=operations, commit_message=commit_message, revision=revision)


def _stage_adapter(source: Any, tmp: Path, adapter_name: str | None) -> Path:
    """A folder holding only adapter_config.json and adapter_model.safetensors of the adapter to push."""
    if isinstance(source, (str, os.PathLike)):
        src = Path(source)
        src = src.parent if src.is_file() else src
        missing = [name for name in ADAPTER_FILES if not (src / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"'{src}' is not a saved RST adapter (missing {missing}); save it with model.save_pretrained(folder)."
            )
        for name in ADAPTER_FILES:
            shutil.copy2(src / name, tmp / name)
        return tmp

    from peft import PeftModel

    if not isinstance(source, PeftModel):
        raise TypeError(f"push_adapter_to_hub needs a PeftModel or an adapter folder, got {type(source).__name__}.")
    adapter_name = adapter_name or source.active_adapter
    if adapter_name not in source.peft_config:
        raise ValueError(f"The model has no adapter '{adapter_name}'; it has {sorted(source.peft_config)}.")
    # RST stores embedding entries sparsely like every other weight: never add dense embedding copies
    source.save_pretrained(tmp, selected_adapters=[adapter_name], save_embedding_layers=False)
    # peft writes non-default adapters to a subfolder named after them
    folder = tmp if adapter_name == "default" else tmp / adapter_name
    if not (folder / WEIGHTS_NAME).is_file() or not (folder / CONFIG_NAME).is_file():
        raise RuntimeError(f"save_pretrained did not write {list(ADAPTER_FILES)} for adapter '{adapter_name}'.")
    return folder
