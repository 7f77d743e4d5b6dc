"""One base model, many RST domain patches: switching, exactness, memory, and safe loading (issue 3 items 2-3)."""

from __future__ import annotations

import os

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_vision import tiny_clip_vision_config  # same folder
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import BaseWeightsMismatchError, RSTConfig, RSTLayer, RSTModel
from peft_rst.format import RSTFormatError

CONFIG = tiny_clip_vision_config()


def pretrained_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(CONFIG).state_dict()


def fresh_base(state) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection(CONFIG)
    model.load_state_dict(state)
    return model.eval()


def train_domain(state, seed: int, folder, tau: float = 1e-3) -> torch.Tensor:
    """Train one RST adapter a few steps on a domain of its own; save it; return its outputs on PIXELS."""
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base(state), RSTConfig(tau=tau))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    domain = torch.randn(4, 3, 16, 16) * (seed + 1)
    for _ in range(3):
        model(pixel_values=domain).image_embeds.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    with torch.no_grad():
        return model(pixel_values=PIXELS).image_embeds


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    state = pretrained_state()
    folders, outputs = [], []
    for seed in range(3):
        folder = tmp_path_factory.mktemp(f"domain{seed}")
        outputs.append(train_domain(state, seed, folder))
        folders.append(folder)
    return state, folders, outputs


def load_all(state, folders) -> PeftModel:
    model = PeftModel.from_pretrained(fresh_base(state), folders[0], adapter_name="d0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"d{i}")
    return model


def test_switching_between_domains_is_exact_and_disable_gives_the_base(domains):
    state, folders, outputs = domains
    base_out = fresh_base(state)(pixel_values=PIXELS).image_embeds.detach()
    model = load_all(state, folders)
    with torch.no_grad():
        for name in ("d2", "d0", "d1", "d2", "d1"):
            model.set_adapter(name)
            assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[int(name[1])])
        with model.disable_adapter():
            assert torch.equal(model(pixel_values=PIXELS).image_embeds, base_out)
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[1])
    # the base parameters hold w0 again once no adapter is active
    model.base_model.disable_adapter_layers()
    for key, value in model.get_base_model().state_dict().items():
        if ".rst_" not in key:
            assert torch.equal(value, state[key.replace("base_layer.", "")]), key


def test_inference_adapters_hold_their_file_not_a_dense_copy(domains):
    state, folders, _ = domains
    model = load_all(state, folders)
    dense_bytes = sum(t.numel() * t.element_size() for t in state.values())
    for i, folder in enumerate(folders):
        held = 0
        for module in model.modules():
            if isinstance(module, RSTLayer):
                assert f"d{i}" not in module.rst_weight  # no dense W for inference adapters
                held += module.rst_sparse.nbytes(f"d{i}")
        on_disk = os.path.getsize(folder / "adapter_model.safetensors")
        changed = sum(
            e.indices.numel()
            for m in model.modules()
            if isinstance(m, RSTLayer)
            for e in m.rst_sparse[f"d{i}"].values()
        )
        # decoded positions (int32) + fp32 values: ~1.3x the compact file
        assert held == 8 * changed and held < 2 * on_disk < dense_bytes


def test_switch_touches_only_changed_entries(domains):
    state, folders, _ = domains
    model = load_all(state, folders)
    model.set_adapter("d1")
    layer = next(m for m in model.modules() if isinstance(m, RSTLayer) and m._patched == "d1")
    changed = sum(idx.numel() for _, idx, _ in layer._patch_backup)
    total = sum(p.numel() for p in layer.get_base_layer().parameters(recurse=False))
    assert 0 < changed < total


def test_merge_and_unload_of_an_inference_adapter(domains):
    state, folders, outputs = domains
    model = load_all(state, folders)
    model.set_adapter("d2")
    merged = model.merge_and_unload()
    assert not any(isinstance(m, RSTLayer) for m in merged.modules())
    assert torch.equal(merged(pixel_values=PIXELS).image_embeds, outputs[2])


def test_resaving_an_inference_adapter_gives_the_same_file(domains, tmp_path):
    state, folders, _ = domains
    model = load_all(state, folders)
    model.save_pretrained(tmp_path, selected_adapters=["d1"])
    original = load_file(folders[1] / "adapter_model.safetensors")
    again = load_file(tmp_path / "d1" / "adapter_model.safetensors")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


def assert_model_unchanged(model, state):
    assert not any(isinstance(m, RSTLayer) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_other_base_weights_are_refused_with_an_override(domains):
    state, folders, outputs = domains
    other = {k: v.clone() for k, v in state.items()}
    other["vision_model.encoder.layers.1.mlp.fc2.weight"][0, 0] += 1.0
    base = fresh_base(other)
    with pytest.raises(
        BaseWeightsMismatchError, match="1 of .* trained from different base weights.*layers.1.mlp.fc2"
    ):
        PeftModel.from_pretrained(base, folders[0])
    assert_model_unchanged(base, other)
    override = RSTConfig.from_pretrained(folders[0])
    override.check_base_fingerprint = False
    model = PeftModel.from_pretrained(fresh_base(other), folders[0], config=override)
    assert model(pixel_values=PIXELS).image_embeds.shape == outputs[0].shape


def test_other_shapes_are_refused(domains):
    state, folders, _ = domains
    wider = CLIPVisionConfig(**{**CONFIG.to_dict(), "intermediate_size": 48})
    with pytest.raises((RSTFormatError, ValueError), match="fc1"):
        PeftModel.from_pretrained(CLIPVisionModelWithProjection(wider), folders[0])


def corrupt(folder, tmp_path, edit) -> str:
    tensors = load_file(folder / "adapter_model.safetensors")
    edit(tensors)
    out = tmp_path / "corrupt"
    out.mkdir()
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    return out


def key_of(tensors, fragment: str) -> str:
    return next(k for k in tensors if fragment in k)


def _edit(fragment: str, change):
    """An edit of the saved tensor whose key contains `fragment` (None from `change` deletes the tensor)."""

    def edit(tensors):
        key = key_of(tensors, fragment)
        new = change(tensors[key])
        if new is None:
            del tensors[key]
        else:
            tensors[key] = new

    return edit


@pytest.mark.parametrize(
    "edit, message",
    [
        (_edit("fc1.rst_weight.weight.val", lambda t: t[:-1]), "fc1"),
        (_edit("fc1.rst_weight.weight.val", lambda t: torch.full_like(t, float("nan"))), "fc1"),
        (_edit("fc1.rst_weight.weight.idx", lambda t: t[:-3]), "fc1"),
        (_edit("k_proj.rst_weight.weight.idx", lambda t: None), "k_proj"),
        (_edit("fc2.rst_weight.weight.idx", lambda t: torch.zeros_like(t)), "fc2"),
    ],
    ids=["truncated-values", "nan-values", "truncated-positions", "missing-positions", "corrupt-header"],
)
def test_broken_files_are_clear_errors_and_leave_the_model_unchanged(domains, tmp_path, edit, message):
    state, folders, outputs = domains
    broken = corrupt(folders[0], tmp_path, edit)
    base = fresh_base(state)
    with pytest.raises((RSTFormatError, ValueError), match=message):
        PeftModel.from_pretrained(base, broken)
    assert_model_unchanged(base, state)
    # a second adapter that fails to load is removed again; the first keeps working
    model = PeftModel.from_pretrained(fresh_base(state), folders[1], adapter_name="good")
    with pytest.raises((RSTFormatError, ValueError), match=message):
        model.load_adapter(broken, adapter_name="bad")
    assert list(model.peft_config) == ["good"]
    assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[1])


def test_a_merged_base_is_not_the_base_the_adapters_were_trained_from(domains):
    state, folders, _ = domains
    merged = PeftModel.from_pretrained(fresh_base(state), folders[0]).merge_and_unload()
    with pytest.raises(BaseWeightsMismatchError, match="trained from different base weights"):
        PeftModel.from_pretrained(merged, folders[1])


def test_loading_a_domain_keeps_the_active_one_patched_in(domains):
    state, folders, outputs = domains
    model = PeftModel.from_pretrained(fresh_base(state), folders[0], adapter_name="d0")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[0])
        model.load_adapter(folders[1], adapter_name="d1")
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[0])
        model.set_adapter("d1")
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[1])


def test_casting_the_model_casts_the_loaded_domains(domains):
    state, folders, outputs = domains
    model = load_all(state, folders)
    model.set_adapter("d1")
    model.double()  # while d1 is patched in: its backup of w0 is cast on restore
    layers = [m for m in model.modules() if isinstance(m, RSTLayer)]
    assert all(e.values.dtype == torch.float64 for m in layers for e in m.rst_sparse["d2"].values())
    with torch.no_grad():
        for name in ("d2", "d1"):
            model.set_adapter(name)
            out = model(pixel_values=PIXELS.double()).image_embeds
            torch.testing.assert_close(out, outputs[int(name[1])].double(), rtol=1e-5, atol=1e-6)
        model.base_model.disable_adapter_layers()
    for key, value in model.get_base_model().state_dict().items():
        if ".rst_" not in key:  # the adapters' own keys (dense W, materialised by state_dict())
            assert torch.equal(value, state[key.replace("base_layer.", "")].double()), key


def _train_with_head(state, seed: int, folder) -> None:
    torch.manual_seed(seed)
    model = get_peft_model(fresh_base(state), RSTConfig(tau=1e-3, modules_to_save=["visual_projection"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(pixel_values=torch.randn(4, 3, 16, 16) * (seed + 1)).image_embeds.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


def _snapshot(model: PeftModel, names: list[str]) -> dict:
    outputs = {}
    with torch.no_grad():
        for name in names:
            model.set_adapter(name)
            outputs[name] = model(pixel_values=PIXELS).image_embeds
    return {
        "targeted": sorted(model.base_model.targeted_module_names),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "state_keys": sorted(model.state_dict()),
        "outputs": outputs,
    }


@pytest.mark.parametrize("with_head", [False, True], ids=["backbone", "backbone+modules_to_save"])
def test_loading_more_domains_by_the_fast_path_equals_peft_generic_injection(
    domains, tmp_path, monkeypatch, with_head
):
    state, folders, _ = domains
    if with_head:
        folders = [tmp_path / f"head{seed}" for seed in range(3)]
        for seed, folder in enumerate(folders):
            _train_with_head(state, seed, folder)
    names = [f"d{i}" for i in range(len(folders))]

    taken = []
    fast_path = RSTModel._add_inference_adapter_to_existing_layers

    def spy(self, model, adapter_name):
        taken.append(fast_path(self, model, adapter_name))
        return taken[-1]

    monkeypatch.setattr(RSTModel, "_add_inference_adapter_to_existing_layers", spy)
    fast = _snapshot(load_all(state, folders), names)
    assert taken[1:] == [True, True]  # the first adapter wraps the model; the further ones take the fast path

    monkeypatch.setattr(RSTModel, "_add_inference_adapter_to_existing_layers", lambda *args: False)
    generic = _snapshot(load_all(state, folders), names)

    assert fast["targeted"] == generic["targeted"]
    assert fast["requires_grad"] == generic["requires_grad"]
    assert fast["state_keys"] == generic["state_keys"]
    for name in names:
        assert torch.equal(fast["outputs"][name], generic["outputs"][name]), name
    assert len({tuple(out.flatten().tolist()) for out in fast["outputs"].values()}) == len(names)


def test_loading_a_domain_next_to_a_trainable_adapter_keeps_its_requires_grad_flags(domains, monkeypatch):
    state, folders, _ = domains

    def flags_after_loading() -> dict[str, bool]:
        model = get_peft_model(fresh_base(state), RSTConfig(tau=1e-3))
        frozen = next(p for n, p in model.named_parameters() if "fc1.rst_weight.default.weight" in n)
        frozen.requires_grad_(False)  # a user freezing part of the trainable adapter
        model.load_adapter(folders[0], adapter_name="d0")
        return {n: p.requires_grad for n, p in model.named_parameters()}

    fast = flags_after_loading()
    monkeypatch.setattr(RSTModel, "_add_inference_adapter_to_existing_layers", lambda *args: False)
    generic = flags_after_loading()
    assert fast == generic
    assert sum(fast.values()) == sum(1 for n in fast if ".rst_weight.default." in n) - 1


def test_reloading_an_active_domain_under_its_name_replaces_its_entries(domains):
    state, folders, outputs = domains
    model = PeftModel.from_pretrained(fresh_base(state), folders[0], adapter_name="x")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[0])
        model.load_adapter(folders[1], adapter_name="x")
        assert torch.equal(model(pixel_values=PIXELS).image_embeds, outputs[1])
        with model.disable_adapter():
            assert torch.equal(
                model(pixel_values=PIXELS).image_embeds, fresh_base(state)(pixel_values=PIXELS).image_embeds
            )
