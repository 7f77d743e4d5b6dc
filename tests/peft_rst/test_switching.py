"""RSTModel.set_adapter (adapter modules found once) against peft's generic set_adapter, and adapter bookkeeping."""

from __future__ import annotations

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import set_adapter as peft_set_adapter
from peft.utils import ModulesToSaveWrapper
from torch import nn

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import RSTConfig, RSTLayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.lin1 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.lin0(x).relu()))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))


def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def save_domain(folder, seed: int) -> None:
    model = get_peft_model(base(), RSTConfig(tau=1e-3, modules_to_save=["head"]))
    torch.manual_seed(seed)  # after `base()`, which seeds its own weights: each domain trains on its own data
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        model(torch.randn(5, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(folder)


def load(folders) -> PeftModel:
    model = PeftModel.from_pretrained(base(), folders[0], adapter_name="d0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"d{i}")
    return model


def state(model: nn.Module) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "flags": {k: v.requires_grad for k, v in model.named_parameters()},
        "active": [(type(m).__name__, m.active_adapters) for m in model.modules() if hasattr(m, "active_adapters")],
    }


def test_switching_equals_peft_generic_set_adapter(tmp_path):
    folders = [tmp_path / f"d{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        save_domain(folder, i)
    ours, generic = load(folders), load(folders)
    for name in ("d2", "d0", "d1", "d1", "d2"):
        ours.set_adapter(name)
        peft_set_adapter(generic.base_model.model, name, layer_cls=RSTLayer)  # peft's walk over every module
        generic.base_model.active_adapter = name
        a, b = state(ours), state(generic)
        assert a["flags"] == b["flags"] and a["active"] == b["active"]
        assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
        with torch.no_grad():
            assert torch.equal(ours(X), generic(X)), name


def test_adapters_loaded_or_deleted_after_a_switch_are_switched_too(tmp_path):
    folders = [tmp_path / f"d{i}" for i in range(3)]
    for i, folder in enumerate(folders):
        save_domain(folder, i)
    model = load(folders[:2])
    model.set_adapter("d1")
    model.load_adapter(folders[2], adapter_name="d2")  # new modules_to_save copies, new adapter entries
    model.set_adapter("d2")
    alone = PeftModel.from_pretrained(base(), folders[2])
    with torch.no_grad():
        assert torch.equal(model(X), alone(X))
    model.delete_adapter("d1")
    model.set_adapter("d0")
    with torch.no_grad():
        assert torch.equal(model(X), PeftModel.from_pretrained(base(), folders[0])(X))


def test_non_float_parameters_get_a_frozen_copy():
    model = base()
    model.lin0.register_parameter("levels", nn.Parameter(torch.arange(16, dtype=torch.int32), requires_grad=False))
    peft_model = get_peft_model(model, RSTConfig())  # peft's own set_adapter raised on the integer W
    flags = {k: p.requires_grad for k, p in peft_model.named_parameters() if ".rst_weight." in k}
    assert flags["base_model.model.lin0.rst_weight.default.levels"] is False
    assert flags["base_model.model.lin0.rst_weight.default.weight"] is True
    peft_model.add_adapter("other", RSTConfig())
    peft_model.set_adapter("other")
    assert not peft_model.base_model.model.lin0.rst_weight["other"]["levels"].requires_grad
    assert peft_model.base_model.model.lin0.rst_weight["other"]["weight"].requires_grad


def test_a_model_unpickled_where_no_adapter_was_loaded_still_patches_in_the_forward_pass(tmp_path, monkeypatch):
    """The forward pass skips looking for inference adapters while none was ever added in the process. A model
    unpickled into such a process holds some, so a layer whose active adapter is changed without RST's eager patch
    (a plain attribute write, as peft's generic code makes in places) must still patch it in when it runs."""
    import pickle

    from peft_rst import layer as rst_layer

    folders = [tmp_path / f"d{i}" for i in range(2)]
    for i, folder in enumerate(folders):
        save_domain(folder, i)
    reference, payload = load(folders), pickle.dumps(load(folders))
    reference.set_adapter("d1")
    with torch.no_grad():
        expected = reference(X)
    monkeypatch.setattr(rst_layer, "_generation", [0])  # as in a fresh process
    model = pickle.loads(payload)
    for module in model.modules():
        if isinstance(module, RSTLayer):
            module._active_adapter = "d1"
        elif isinstance(module, ModulesToSaveWrapper):
            module.set_adapter("d1")
    with torch.no_grad():
        assert torch.equal(model(X), expected)
