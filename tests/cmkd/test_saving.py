"""cmkd.saving: an adapted model saved for deployment (adapter or model folder, card, processor), atomically."""

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_clip_models import CharTokenizer, tiny_clip

from cmkd import CLIPAdaptationModel, apply_peft
from cmkd.saving import clean_interrupted_saves, save_adapted_model

CARD = dict(
    repo_id=None,
    base_model="tiny/clip",
    dataset="toy",
    source_domain="clean",
    target_domain="styled",
    accuracy=0.5,
    metric="accuracy",
    training_notes="notes",
    base_loading_code="base = ...",
)


def adapted(peft: str):
    model = CLIPAdaptationModel.from_clip(tiny_clip(), ["a", "b", "c"], "a {}", tokenizer=CharTokenizer())
    model.name_or_path = model.config._name_or_path = "tiny/clip"
    return model if peft == "full" else apply_peft(model, peft, **({"tau": 1e-3} if peft == "rst" else {}))


def test_full_model_folder_reloads_the_same_weights_with_its_card(tmp_path):
    model = adapted("full")
    saved = save_adapted_model(model, tmp_path, "full", CARD)
    assert saved.path == tmp_path / "model" and saved.dsp == sum(p.numel() for p in model.parameters())
    again = CLIPAdaptationModel.from_pretrained(saved.path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    card = (saved.path / "README.md").read_text()
    assert "base_model: tiny/clip" in card and "50.00 %" in card
    assert saved.nbytes == (saved.path / "model.safetensors").stat().st_size


def test_rst_adapter_card_is_measured_from_the_files(tmp_path):
    model = adapted("rst")
    with torch.no_grad():  # one changed backbone entry, as after training
        next(p for n, p in model.named_parameters() if "rst_weight" in n and p.ndim == 2)[0, 0] += 1.0
    saved = save_adapted_model(model, tmp_path, "rst", CARD)
    assert saved.path == tmp_path / "adapter" and (saved.path / "adapter_config.json").is_file()
    assert json.loads((saved.path / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny/clip"
    assert "tiny/clip" in (saved.path / "README.md").read_text() and saved.dsp > 0
    stored = ("adapter_model.safetensors", "adapter_config.json")  # what peft_rst.report counts as the adapter
    assert saved.nbytes == sum((saved.path / f).stat().st_size for f in stored)
    assert any(k.endswith(".idx") for k in load_file(saved.path / "adapter_model.safetensors"))


def test_a_failed_save_keeps_the_earlier_folder_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    model = adapted("full")
    first = save_adapted_model(model, tmp_path, "full", CARD)
    before = (first.path / "model.safetensors").read_bytes()
    monkeypatch.setattr(
        type(model), "save_pretrained", lambda self, path, **kw: (_ for _ in ()).throw(OSError("disk full"))
    )
    with pytest.raises(OSError, match="disk full"):
        save_adapted_model(model, tmp_path, "full", CARD)
    assert (first.path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_clean_interrupted_saves_removes_only_what_a_killed_save_leaves(tmp_path):
    for name in (".adapter.tmp-1", ".model.old-2", "adapter", "checkpoint-3"):
        (tmp_path / name).mkdir()
    (tmp_path / ".task_result.json.tmp").write_text("{")
    (tmp_path / "task_result.json").write_text("{}")
    removed = clean_interrupted_saves(tmp_path)
    assert sorted(p.name for p in removed) == [".adapter.tmp-1", ".model.old-2", ".task_result.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "checkpoint-3", "task_result.json"]


def test_push_failures_name_the_folder_and_other_errors_propagate(tmp_path, monkeypatch):
    import peft_rst
    from cmkd.saving import HubPushError, push_adapted_model

    def refuse(error):
        def push(*args, **kwargs):
            raise error

        return push

    monkeypatch.setattr(peft_rst, "push_adapter_to_hub", refuse(ConnectionError("no route to host")))
    with pytest.raises(HubPushError, match=f"could not push {tmp_path} to me/a on .*no route.*hf upload me/a"):
        push_adapted_model(None, tmp_path, "rst", "me/a", {})
    monkeypatch.setattr(peft_rst, "push_adapter_to_hub", refuse(KeyError("a bug")))
    with pytest.raises(KeyError):
        push_adapted_model(None, tmp_path, "rst", "me/a", {})
