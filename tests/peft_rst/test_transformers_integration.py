"""transformers' adapter API with RST adapters (issue 12 item 1): load_adapter, set/disable/enable/active_adapters,
from_pretrained and pipeline on an adapter folder, each against `PeftModel.from_pretrained` in the same process."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from PIL import Image
from safetensors.torch import load_file
from tiny_vision import tiny_clip_vision_config  # same folder
from transformers import (
    CLIPVisionModelWithProjection,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
    pipeline,
)

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import BaseWeightsMismatchError, RSTConfig, RSTLayer
from peft_rst.format import RSTFormatError

CLIP = tiny_clip_vision_config()
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIP).state_dict()


def clip(state) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection(CLIP)
    model.load_state_dict(state)
    return model.eval()


def train_and_save(model, config, folder, seed: int, out=lambda o: o.image_embeds, inputs=None) -> None:
    """A few SGD steps of RST on a domain of its own, then save_pretrained."""
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=5e-2)
    x = torch.randn(4, 3, 16, 16) * (seed + 1) if inputs is None else inputs
    for _ in range(3):
        out(peft_model(pixel_values=x)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)


@pytest.fixture(scope="module")
def clip_domains(tmp_path_factory):
    """Two RST adapters of one CLIP vision tower, and each one's outputs through PeftModel.from_pretrained."""
    state = clip_state()
    folders, outputs = [], []
    for seed in range(2):
        folder = tmp_path_factory.mktemp(f"clip{seed}")
        train_and_save(clip(state), RSTConfig(tau=1e-3), folder, seed)
        with torch.no_grad():
            outputs.append(PeftModel.from_pretrained(clip(state), folder)(pixel_values=PIXELS).image_embeds)
        folders.append(folder)
    with torch.no_grad():
        base_out = clip(state)(pixel_values=PIXELS).image_embeds
    return state, folders, outputs, base_out


def embeds(model) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS).image_embeds


def test_load_adapter_gives_the_peft_outputs(clip_domains):
    state, folders, outputs, base_out = clip_domains
    model = clip(state)
    info = model.load_adapter(folders[0], adapter_name="d0")
    assert not info.unexpected_keys and not info.missing_keys
    assert torch.equal(embeds(model), outputs[0])
    assert not torch.equal(outputs[0], base_out)  # the adapter changes the outputs at all
    assert model.active_adapters() == ["d0"]


def test_set_disable_enable_and_active_adapters(clip_domains):
    state, folders, outputs, base_out = clip_domains
    model = clip(state)
    model.load_adapter(folders[0], adapter_name="d0")
    model.load_adapter(folders[1], adapter_name="d1")
    assert model.active_adapters() == ["d0"]  # loading another adapter does not activate it (as with LoRA)
    for name in ("d1", "d0", "d1"):
        model.set_adapter(name)
        assert model.active_adapters() == [name]
        assert torch.equal(embeds(model), outputs[int(name[1])])
    model.disable_adapters()
    assert torch.equal(embeds(model), base_out)
    model.enable_adapters()
    assert torch.equal(embeds(model), outputs[1])
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("nope")


def test_load_adapter_from_a_state_dict_and_config(clip_domains):
    state, folders, outputs, _ = clip_domains
    model = clip(state)
    model.load_adapter(
        adapter_name="s",
        peft_config=PeftConfig.from_pretrained(folders[1]),
        adapter_state_dict=load_file(folders[1] / "adapter_model.safetensors"),
    )
    assert torch.equal(embeds(model), outputs[1])


def test_delete_adapter_and_save_pretrained_round_trip(clip_domains, tmp_path):
    state, folders, outputs, _ = clip_domains
    model = clip(state)
    model.load_adapter(folders[0], adapter_name="d0")
    model.load_adapter(folders[1], adapter_name="d1")
    model.delete_adapter("d1")
    assert list(model.peft_config) == ["d0"] and model.active_adapters() == ["d0"]
    assert torch.equal(embeds(model), outputs[0])
    model.save_pretrained(tmp_path)  # transformers saves the adapter alone, through RST's sparse encoder
    assert torch.equal(embeds(PeftModel.from_pretrained(clip(state), tmp_path)), outputs[0])


def test_a_trainable_adapter_is_reset_after_each_step(clip_domains, rst_tools):
    """load_adapter(is_trainable=True) keeps the RST reset: peft's inject_adapter_in_model drops the tuner."""
    state, folders, outputs, _ = clip_domains
    model = clip(state)
    model.load_adapter(folders[0], adapter_name="d0", is_trainable=True)
    model.train()
    assert torch.equal(embeds(model), outputs[0])
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(".rst_weight.d0." in n for n, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.SGD(params, lr=1e-3)
    model(pixel_values=PIXELS).image_embeds.pow(2).mean().backward()
    optimizer.step()
    rst_tools.assert_reset_invariant(model, tau=1e-3, adapter="d0")


def test_add_adapter_trains_with_the_reset(rst_tools):
    """add_adapter + a plain loop: the reset runs (entries within tau are back at w0, larger moves stay)."""
    model = clip(clip_state())
    model.add_adapter(RSTConfig(tau=1e-4), adapter_name="t")
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(pixel_values=PIXELS).image_embeds.pow(2).mean().backward()
    optimizer.step()
    rst_tools.assert_reset_invariant(model, tau=1e-4, adapter="t")
    bases = rst_tools.base_weights(model)
    deltas = [(w - bases[n]).abs() for n, w in rst_tools.adapter_weights(model, "t").items()]
    assert sum(int((d > 1e-4).sum()) for d in deltas) > 0  # the step did change weights


def test_a_refused_adapter_leaves_the_model_as_it_was(clip_domains, tmp_path):
    state, folders, outputs, base_out = clip_domains
    other = tmp_path / "other"
    train_and_save(clip(clip_state(seed=5)), RSTConfig(tau=1e-3), other, seed=0)  # other base weights
    model = clip(state)
    with pytest.raises(BaseWeightsMismatchError):
        model.load_adapter(other, adapter_name="x")
    assert not any(isinstance(m, RSTLayer) for m in model.modules())
    assert not hasattr(model, "peft_config") and not model._hf_peft_config_loaded
    assert model.state_dict().keys() == state.keys()
    assert all(p.requires_grad for p in model.parameters())  # peft's injection had frozen the base
    assert torch.equal(embeds(model), base_out)
    # with an adapter loaded already: that one stays, active and intact
    model.load_adapter(folders[0], adapter_name="d0")
    layers = [name for name, m in model.named_modules() if isinstance(m, RSTLayer)]
    with pytest.raises(BaseWeightsMismatchError):
        model.load_adapter(other, adapter_name="x")
    assert list(model.peft_config) == ["d0"]
    assert [name for name, m in model.named_modules() if isinstance(m, RSTLayer)] == layers
    assert torch.equal(embeds(model), outputs[0])


def _corrupt(folder, tmp_path, edit) -> object:
    """A copy of adapter folder `folder` whose tensors went through `edit` (a dict -> dict function)."""
    import shutil

    from safetensors.torch import save_file

    copy = tmp_path / f"corrupt{len(list(tmp_path.iterdir()))}"
    shutil.copytree(folder, copy)
    tensors = edit(load_file(copy / "adapter_model.safetensors"))
    save_file(tensors, copy / "adapter_model.safetensors")
    return copy


def _flip_first(tensors: dict, part: str) -> dict:
    key = next(k for k in sorted(tensors) if k.endswith(part))
    raw = tensors[key].contiguous().view(torch.uint8).reshape(-1).clone()
    raw[-1] ^= 0x04
    return {**tensors, key: raw.view(tensors[key].dtype).reshape(tensors[key].shape)}


def _drop_one_prefix(tensors: dict) -> dict:
    key = next(k for k in sorted(tensors) if k.endswith(".val"))
    out = dict(tensors)
    out[key.removeprefix("base_model.model.")] = out.pop(key)
    return out


@pytest.mark.parametrize(
    "edit, pattern",
    [
        (lambda t: _flip_first(t, ".val"), r"fails its checksum"),
        (lambda t: _flip_first(t, ".idx"), r"fails its checksum"),
        # the transformers route strips peft's prefix from every key; the file is checked under its own keys first
        (_drop_one_prefix, r"missing from the file"),
    ],
    ids=["flip-val", "flip-idx", "key-renamed"],
)
def test_a_corrupted_file_is_refused_on_every_transformers_route(clip_domains, tmp_path, edit, pattern):
    state, folders, outputs, base_out = clip_domains
    bad = _corrupt(folders[1], tmp_path, edit)
    model = clip(state)
    with pytest.raises(RSTFormatError, match=pattern):
        model.load_adapter(bad, adapter_name="x")
    assert not any(isinstance(m, RSTLayer) for m in model.modules())
    assert not hasattr(model, "peft_config") and not model._hf_peft_config_loaded
    assert torch.equal(embeds(model), base_out)
    with pytest.raises(RSTFormatError, match=pattern):
        model.load_adapter(
            adapter_name="x",
            peft_config=PeftConfig.from_pretrained(bad),
            adapter_state_dict=load_file(bad / "adapter_model.safetensors"),
        )
    assert not hasattr(model, "peft_config") and torch.equal(embeds(model), base_out)
    # next to a loaded adapter, under a new name and by hotswap: the loaded one stays, active and intact
    model.load_adapter(folders[0], adapter_name="d0")
    with pytest.raises(RSTFormatError, match=pattern):
        model.load_adapter(bad, adapter_name="x")
    with pytest.raises(RSTFormatError, match=pattern):
        model.load_adapter(bad, adapter_name="d0", hotswap=True)
    assert list(model.peft_config) == ["d0"] and model.active_adapters() == ["d0"]
    assert torch.equal(embeds(model), outputs[0])


def test_an_adapter_saved_by_transformers_round_trips_and_is_still_checked(clip_domains, tmp_path):
    """transformers' save_pretrained puts every key, the integrity record's too, under `base_model.model.`."""
    state, folders, outputs, _ = clip_domains
    model = clip(state)
    model.load_adapter(folders[1], adapter_name="d1")
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert "base_model.model.rst_integrity" in saved and all(k.startswith("base_model.model.") for k in saved)
    assert torch.equal(embeds(PeftModel.from_pretrained(clip(state), tmp_path / "saved")), outputs[1])
    again = clip(state)
    again.load_adapter(tmp_path / "saved", adapter_name="d1")
    assert torch.equal(embeds(again), outputs[1])
    bad = _corrupt(tmp_path / "saved", tmp_path, lambda t: _flip_first(t, ".val"))
    with pytest.raises(RSTFormatError, match="fails its checksum"):
        clip(state).load_adapter(bad, adapter_name="d1")
    with pytest.raises(RSTFormatError, match="fails its checksum"):
        PeftModel.from_pretrained(clip(state), bad)


def test_lora_adapters_still_take_transformers_path(tmp_path):
    state = clip_state()
    lora = get_peft_model(clip(state), LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    reference = embeds(PeftModel.from_pretrained(clip(state), tmp_path))
    model = clip(state)
    model.load_adapter(tmp_path, adapter_name="lora")
    assert torch.equal(embeds(model), reference)


# ------------------------------------------------------------------------------------------------ pipeline
VIT = ViTConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=16,
    patch_size=8,
    num_labels=3,
    id2label={0: "a", 1: "b", 2: "c"},
    label2id={"a": 0, "b": 1, "c": 2},
)


@pytest.fixture(scope="module")
def vit_folders(tmp_path_factory):
    """A saved tiny ViT classifier with its processor, and an RST adapter (head in modules_to_save) pointing at it."""
    base_dir = tmp_path_factory.mktemp("vit_base")
    torch.manual_seed(0)
    ViTForImageClassification(VIT).save_pretrained(base_dir)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(base_dir)
    adapter_dir = tmp_path_factory.mktemp("vit_adapter")
    model = ViTForImageClassification.from_pretrained(base_dir)
    train_and_save(model, RSTConfig(tau=1e-3, modules_to_save=["classifier"]), adapter_dir, 0, out=lambda o: o.logits)
    return base_dir, adapter_dir


def test_pipeline_and_from_pretrained_on_an_adapter_folder(vit_folders):
    base_dir, adapter_dir = vit_folders
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    inputs = ViTImageProcessor.from_pretrained(base_dir)(image, return_tensors="pt")
    reference = PeftModel.from_pretrained(ViTForImageClassification.from_pretrained(base_dir), adapter_dir).eval()
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
        base_logits = ViTForImageClassification.from_pretrained(base_dir).eval()(**inputs).logits
    assert not torch.equal(ref_logits, base_logits)

    model = ViTForImageClassification.from_pretrained(adapter_dir)  # base from adapter_config.json
    assert any(isinstance(m, RSTLayer) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref_logits)

    classifier = pipeline("image-classification", model=str(adapter_dir))
    with torch.no_grad():
        assert torch.equal(classifier.model(**inputs).logits, ref_logits)
    scores = {r["label"]: r["score"] for r in classifier(image, top_k=3)}
    expected = ref_logits.softmax(-1)[0]
    assert scores == pytest.approx({VIT.id2label[i]: expected[i].item() for i in range(3)}, abs=1e-6)
