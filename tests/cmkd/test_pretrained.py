"""cmkd.pretrained: a CLIP named by folder or Hub id loads, or fails at once with the fix (no minute of retries)."""

import pytest
from tiny_clip_models import tiny_clip
from transformers import CLIPTextConfig, CLIPTextModel

from cmkd.pretrained import ModelSourceError, load_clip, model_source


def test_a_saved_folder_loads_with_its_tokenizer_and_processor(tmp_path):
    from transformers import CLIPTokenizerFast

    from cmkd.toy import TINY_CLIP_PATH

    clip = load_clip(str(TINY_CLIP_PATH))
    assert clip.image_size == 32 and clip.processor is not None and isinstance(clip.tokenizer, CLIPTokenizerFast)
    folder = tmp_path / "bare"
    tiny_clip().save_pretrained(folder)  # a local folder: no Hub lookup
    assert model_source(str(folder)) == {}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "missing", "it is not a folder"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "it is not a folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "the folder has no config.json"),
    ],
)
def test_a_local_path_that_holds_no_model_is_named(tmp_path, make, message):
    with pytest.raises(ModelSourceError, match=message):
        model_source(str(make(tmp_path)))


def test_a_hub_id_that_is_not_cached_fails_at_once_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(
        ModelSourceError, match="not in the local Hugging Face cache .* \\(offline: HF_HUB_OFFLINE=1\\)"
    ):
        load_clip("openai/clip-vit-base-patch16")
    with pytest.raises(ModelSourceError, match="neither a local folder nor a valid Hub id"):
        model_source("not a repo id!")


def test_a_model_that_is_not_a_dual_encoder_is_refused(tmp_path):
    folder = tmp_path / "text_only"
    CLIPTextModel(
        CLIPTextConfig(vocab_size=99, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(folder)
    from cmkd.toy import TINY_CLIP_PATH

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((TINY_CLIP_PATH / name).read_bytes())
    with pytest.raises(ModelSourceError, match="is a CLIPTextModel, not a CLIP dual encoder"):
        load_clip(str(folder))
