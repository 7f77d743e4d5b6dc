"""Hotswapping RST adapters and switching domains under torch.compile (issue 12 item 3)."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_vision import tiny_clip_vision_config  # same folder
from transformers import CLIPVisionModelWithProjection

import peft_rst
from peft_rst import BaseWeightsMismatchError, HotswapError, RSTConfig, RSTLayer

CLIP = tiny_clip_vision_config()
PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
SAVED = ["visual_projection"]


def clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIP).state_dict()


def clip(state) -> CLIPVisionModelWithProjection:
    model = CLIPVisionModelWithProjection(CLIP)
    model.load_state_dict(state)
    return model.eval()


def train_and_save(model, config, folder, seed: int) -> None:
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randn(4, 3, 16, 16) * (seed + 1)
    for _ in range(3):
        peft_model(pixel_values=x).image_embeds.pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(folder)


def embeds(model) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=PIXELS).image_embeds


def make_domains(tmp_path_factory, saved: list[str] | None):
    state = clip_state()
    folders, outputs = [], []
    for seed in range(3):
        folder = tmp_path_factory.mktemp(f"domain{seed}")
        train_and_save(clip(state), RSTConfig(tau=1e-3, modules_to_save=saved), folder, seed)
        outputs.append(embeds(PeftModel.from_pretrained(clip(state), folder)))
        folders.append(folder)
    assert not torch.equal(outputs[0], outputs[1])
    return state, folders, outputs


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    """Three RST adapters (projection head in modules_to_save) and their outputs via PeftModel.from_pretrained."""
    return make_domains(tmp_path_factory, SAVED)


@pytest.fixture(scope="module")
def sparse_domains(tmp_path_factory):
    """Three RST adapters of every parameter (the head too, as a sparse patch: no modules_to_save)."""
    return make_domains(tmp_path_factory, None)


def identities(model) -> dict[str, int]:
    return {name: id(t) for name, t in model.named_parameters()} | {
        f"module:{name}": id(m) for name, m in model.named_modules()
    }


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_same_state(model, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name


# ------------------------------------------------------------------------------------------------ hotswap
def test_hotswap_replaces_an_inference_adapter_in_place(domains):
    state, folders, outputs = domains
    model = PeftModel.from_pretrained(clip(state), folders[0])
    before = identities(model)
    peft_rst.hotswap_adapter(model, folders[1], "default")
    assert torch.equal(embeds(model), outputs[1])
    assert identities(model) == before  # same modules, same parameter objects
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    layers = [m for m in model.modules() if isinstance(m, RSTLayer)]
    assert all(list(m.rst_sparse) == ["default"] for m in layers)  # no scratch adapter left behind
    assert not model.training
    # and back: the swap is exact both ways; disabling still gives the base
    peft_rst.hotswap_adapter(model, folders[0], "default")
    assert torch.equal(embeds(model), outputs[0])
    with model.disable_adapter():
        assert torch.equal(embeds(model), embeds(clip(state)))


def test_hotswap_of_a_trainable_adapter_gives_the_loaded_weights(domains, rst_tools):
    state, folders, _ = domains
    model = PeftModel.from_pretrained(clip(state), folders[0], is_trainable=True)
    model.train()
    weights = rst_tools.adapter_weights(model) | rst_tools.saved_module_weights(model)
    peft_rst.hotswap_adapter(model, folders[2], "default")
    reference = PeftModel.from_pretrained(clip(state), folders[2], is_trainable=True)
    expected = rst_tools.adapter_weights(reference) | rst_tools.saved_module_weights(reference)
    after = rst_tools.adapter_weights(model) | rst_tools.saved_module_weights(model)
    assert after.keys() == expected.keys() == weights.keys()
    for name, w in after.items():
        assert w is weights[name] and w.requires_grad, name  # the optimizer's parameters stay valid
        assert rst_tools.bitwise_equal(w.detach(), expected[name].detach()), name
    assert model.training


def test_load_adapter_hotswap_true_on_a_transformers_model(domains):
    state, folders, outputs = domains
    model = clip(state)
    model.load_adapter(folders[0], adapter_name="x")
    before = identities(model)
    model.load_adapter(folders[2], adapter_name="x", hotswap=True)
    assert torch.equal(embeds(model), outputs[2])
    assert identities(model) == before and list(model.peft_config) == ["x"]


def test_incompatible_adapters_are_refused_and_the_model_is_unchanged(domains, tmp_path):
    state, folders, outputs = domains
    narrower = tmp_path / "narrower"
    train_and_save(clip(state), RSTConfig(tau=1e-3, target_modules=["q_proj"], modules_to_save=SAVED), narrower, 0)
    no_head = tmp_path / "no_head"
    train_and_save(clip(state), RSTConfig(tau=1e-3), no_head, 0)
    other_base = tmp_path / "other_base"
    train_and_save(clip(clip_state(seed=7)), RSTConfig(tau=1e-3, modules_to_save=SAVED), other_base, 0)

    model = PeftModel.from_pretrained(clip(state), folders[0])
    before, ids = snapshot(model), identities(model)
    cases = [
        (narrower, HotswapError, "targets other modules"),
        (no_head, HotswapError, "saves modules"),
        (other_base, BaseWeightsMismatchError, "different base weights"),
    ]
    for folder, error, message in cases:
        with pytest.raises(error, match=message):
            peft_rst.hotswap_adapter(model, folder, "default")
        assert_same_state(model, before)
        assert identities(model) == ids and list(model.peft_config) == ["default"]
        assert torch.equal(embeds(model), outputs[0])
    with pytest.raises(HotswapError, match="No adapter named 'other'"):
        peft_rst.hotswap_adapter(model, folders[1], "other")


# ------------------------------------------------------------------------------------------ torch.compile
class CountingBackend:
    """A torch.compile backend that runs graphs eagerly and counts how many it was given (one per (re)compile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_switching_domains_on_a_compiled_model_does_not_recompile(sparse_domains):
    state, folders, outputs = sparse_domains
    torch._dynamo.reset()
    model = clip(state)
    for i, folder in enumerate(folders):
        model.load_adapter(folder, adapter_name=f"d{i}")
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    for name in ("d0", "d1", "d2", "d0", "d2", "d1"):
        model.set_adapter(name)
        assert torch.equal(embeds(compiled), outputs[int(name[1])]), name
    assert backend.graphs == 1


def test_switching_under_the_base_model_of_a_peft_model_does_not_recompile(sparse_domains):
    state, folders, outputs = sparse_domains
    torch._dynamo.reset()
    model = PeftModel.from_pretrained(clip(state), folders[0], adapter_name="d0")
    model.load_adapter(folders[1], adapter_name="d1")
    backend = CountingBackend()
    compiled = torch.compile(model.get_base_model(), backend=backend)
    for name in ("d0", "d1", "d0"):
        model.set_adapter(name)
        assert torch.equal(embeds(compiled), outputs[int(name[1])]), name
    assert backend.graphs == 1


def test_hotswap_on_a_compiled_peft_model_does_not_recompile(domains):
    state, folders, outputs = domains
    torch._dynamo.reset()
    model = PeftModel.from_pretrained(clip(state), folders[0])
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    assert torch.equal(embeds(compiled), outputs[0])
    for i in (1, 2, 0):
        peft_rst.hotswap_adapter(model, folders[i], "default")
        assert torch.equal(embeds(compiled), outputs[i]), i
    assert backend.graphs == 1


def test_a_trainable_adapter_under_compile_matches_eager():
    torch._dynamo.reset()
    model = get_peft_model(clip(clip_state()), RSTConfig(tau=1e-3, init_weights=False))
    compiled = torch.compile(model.get_base_model(), backend=CountingBackend())
    eager_out = model(pixel_values=PIXELS).image_embeds
    compiled_out = compiled(pixel_values=PIXELS).image_embeds
    assert torch.equal(compiled_out, eager_out)
    assert not torch.equal(eager_out, embeds(clip(clip_state())))  # the dense W is what runs
    (grad,) = torch.autograd.grad(compiled_out.sum(), [next(p for p in model.parameters() if p.requires_grad)])
    assert grad.abs().sum() > 0
