"""state_dict() / load_state_dict() of a model holding inference adapters, against the same adapters held trainable.

An inference adapter keeps only its changed entries and the active one is written into the base parameters; its
state_dict() must still be what peft shows for trained adapters (w0 under the base keys, a dense W per adapter).
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import RSTConfig, RSTLayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.lin1 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin1(self.norm(self.lin0(x)).relu())


X = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))


def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def save_trained(folder, seed: int) -> dict[str, torch.Tensor]:
    """Train an adapter; save it; return its state_dict (trainable adapters: dense W, base keys hold w0)."""
    torch.manual_seed(seed)
    model = get_peft_model(base(), RSTConfig(tau=1e-3))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        model(torch.randn(6, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    folders, states = [], []
    for seed in range(2):
        folder = tmp_path_factory.mktemp(f"a{seed}")
        states.append(save_trained(folder, seed))
        folders.append(folder)
    return folders, states


def load(folders) -> PeftModel:
    model = PeftModel.from_pretrained(base(), folders[0], adapter_name="a0")
    model.load_adapter(folders[1], adapter_name="a1")
    return model


def test_state_dict_shows_w0_and_each_adapter_like_the_trained_model(adapters):
    folders, states = adapters
    model = load(folders)
    model.set_adapter("a1")  # a1 is written into the base parameters now
    state = model.state_dict()
    w0 = base().state_dict()
    for key, value in state.items():
        if ".rst_weight." in key:
            adapter = key.split(".rst_weight.")[1].split(".")[0]
            trained = states[int(adapter[1])][key.replace(f".{adapter}.", ".default.")]
            assert torch.equal(value, trained), key
        else:
            assert torch.equal(value, w0[key.removeprefix("base_model.model.").replace("base_layer.", "")]), key
    assert sum(".rst_weight.a0." in k for k in state) == sum(".rst_weight.a1." in k for k in state) == 6
    # the call changed nothing: a1 is still written into the base, outputs unchanged, no dense W kept
    layers = [m for m in model.modules() if isinstance(m, RSTLayer)]
    assert all(m._patched == "a1" and not m.rst_weight for m in layers)
    with torch.no_grad():
        assert torch.equal(model(X), load_trained(folders[1])(X))


def load_trained(folder) -> PeftModel:
    return PeftModel.from_pretrained(base(), folder, is_trainable=True)


def test_keep_vars_gives_the_live_parameters(adapters):
    folders, _ = adapters
    model = load(folders)
    state = model.state_dict(keep_vars=True)
    layer = model.base_model.model.lin0
    assert state["base_model.model.lin0.base_layer.weight"] is layer.base_layer.weight


def test_load_state_dict_round_trip_between_inference_models(adapters):
    folders, _ = adapters
    source = load(folders)
    target = load(folders[::-1])  # a0 holds the other adapter's entries here, a1 likewise
    target.set_adapter("a0")
    result = target.load_state_dict(source.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for name in ("a0", "a1"):
        source.set_adapter(name)
        target.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(source(X), target(X)), name
    for a, b in zip(source.state_dict().items(), target.state_dict().items(), strict=True):
        assert a[0] == b[0] and torch.equal(a[1], b[1]), a[0]
    # still entries only, not dense copies
    assert all(not m.rst_weight for m in target.modules() if isinstance(m, RSTLayer))


def test_saving_does_not_materialise_dense_weights(adapters, tmp_path, monkeypatch):
    folders, _ = adapters
    model = load(folders)
    calls = []
    original = RSTLayer._w0
    monkeypatch.setattr(RSTLayer, "_w0", lambda self, name: calls.append(name) or original(self, name))
    model.save_pretrained(tmp_path, selected_adapters=["a1"])
    assert not calls
    model.state_dict()
    assert calls
    again = PeftModel.from_pretrained(base(), tmp_path / "a1", adapter_name="a1")
    model.set_adapter("a1")
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
