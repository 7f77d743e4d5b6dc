"""The switch plan (peft_rst.switch_plan): switching inference adapters through flat base buffers, bit for bit."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import RSTConfig, RSTLayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.lin1 = nn.Linear(16, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin1(self.norm(self.lin0(x)).relu()))


X = torch.randn(4, 8, generator=torch.Generator().manual_seed(2))


def base() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.int32 if t.element_size() == 4 else torch.int64)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    work = tmp_path_factory.mktemp("switch_plan")
    out = []
    for seed in range(3):
        # each domain changes its own random third of every parameter, so that their positions differ
        model = get_peft_model(base(), RSTConfig(tau=1e-3, modules_to_save=["head"]))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    chosen = torch.rand(p.shape, generator=g) < 1 / 3
                    p.add_(chosen * torch.randn(p.shape, generator=g))
        model.save_pretrained(work / f"d{seed}")
        out.append(work / f"d{seed}")
    return out


def load(folders) -> PeftModel:
    model = PeftModel.from_pretrained(base(), folders[0], adapter_name="d0")
    for i, folder in enumerate(folders[1:], start=1):
        model.load_adapter(folder, adapter_name=f"d{i}")
    return model


def alone(folder) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(base(), folder)(X)


def w0_of(model: PeftModel) -> dict[str, torch.Tensor]:
    with model.disable_adapter():  # every patch taken out: the base holds w0
        return {k: v.detach().clone() for k, v in model.get_base_model().named_parameters() if ".base_layer." in k}


def assert_holds_w0(model: PeftModel, w0: dict[str, torch.Tensor]) -> None:
    assert w0_of(model).keys() == w0.keys()
    for k, v in w0_of(model).items():
        assert torch.equal(bits(v), bits(w0[k])), k


def test_switches_go_through_one_flat_buffer_and_are_bit_exact(folders):
    model = load(folders)
    w0 = {k.replace(".base_layer", ""): v for k, v in w0_of(model).items()}
    fresh = {k: v for k, v in base().named_parameters() if not k.startswith("head.")}  # head: modules_to_save
    assert w0.keys() == fresh.keys() and all(torch.equal(bits(v), bits(w0[k])) for k, v in fresh.items())
    w0 = w0_of(model)
    expected = [alone(f) for f in folders]
    for name in ("d1", "d2", "d0", "d0", "d2", "d1"):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(model(X), expected[int(name[1])]), name
    plan = model.base_model._switch_plan
    assert plan is not None and plan.current == "d1"
    (flat,) = plan.flat.values()
    bases = [p for k, p in model.get_base_model().named_parameters() if ".base_layer." in k and "head" not in k]
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    assert all(start <= p.data_ptr() < end for p in bases)
    assert len({p.untyped_storage().data_ptr() for p in bases}) == len(bases)  # storages of their own
    # memory: each compiled adapter holds exactly its changed entries
    for name, compiled in plan._compiled.items():
        entries = sum(
            e.indices.numel() for m in model.modules() if isinstance(m, RSTLayer) for e in m.rst_sparse[name].values()
        )
        assert sum(pos.numel() for _, pos, _, _ in compiled.writes) == entries
    assert_holds_w0(model, w0)


def test_layer_level_changes_between_switches_are_seen(folders):
    model = load(folders)
    w0 = w0_of(model)
    model.set_adapter("d1")
    layer = next(m for m in model.modules() if isinstance(m, RSTLayer) and m._patched == "d1")
    layer.restore_base_weights()  # one layer taken out behind the plan's back
    model.set_adapter("d2")
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[2]))
    layer.enable_adapters(False)  # a disabled layer: the switch goes layer by layer
    layer.enable_adapters(True)
    model.set_adapter("d0")
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[0]))
    assert_holds_w0(model, w0)


def test_a_base_edited_in_place_gets_its_new_w0_back(folders):
    model = load(folders)
    model.set_adapter("d1")
    model.set_adapter("d2")  # d1's w0 values are gathered
    lin = model.get_base_model().lin0.base_layer
    with model.disable_adapter(), torch.no_grad():
        lin.weight.add_(0.5)  # a new w0 (its version moves)
    edited = w0_of(model)
    model.set_adapter("d1")
    model.set_adapter("d0")
    assert_holds_w0(model, edited)
    state = model.state_dict()
    model.set_adapter("d2")
    model.load_state_dict(state)  # copies into the base: versions move again, the patch is redone layer by layer
    model.set_adapter("d1")
    assert_holds_w0(model, edited)


def test_a_cast_model_is_laid_out_again(folders):
    model = load(folders)
    model.set_adapter("d1")
    model.double()
    model.set_adapter("d2")
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base(), folders[2]).double()(X.double())
        assert torch.equal(model(X.double()), expected)
    (flat,) = model.base_model._switch_plan.flat.values()
    assert flat.dtype == torch.float64


def test_state_dict_after_switches_saves_with_safetensors_and_holds_w0(folders, tmp_path):
    model = load(folders)
    w0 = w0_of(model)
    model.set_adapter("d2")
    model.set_adapter("d1")
    save_file(model.state_dict(), tmp_path / "all.safetensors")  # refuses tensors sharing a storage
    saved = load_file(tmp_path / "all.safetensors")
    for k, v in w0.items():
        assert torch.equal(bits(saved[f"base_model.model.{k}"]), bits(v)), k
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[1]))


def test_deleting_the_active_adapter_and_loading_another_keep_switching_exact(folders):
    model = load(folders[:2])
    w0 = w0_of(model)
    model.set_adapter("d1")
    model.set_adapter("d0")
    model.delete_adapter("d0")
    model.load_adapter(folders[2], adapter_name="d2")
    model.set_adapter("d2")
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[2]))
    model.set_adapter("d1")
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[1]))
    assert_holds_w0(model, w0)


def test_a_layer_switched_on_its_own_is_taken_out_layer_by_layer(folders):
    model = load(folders)
    w0 = w0_of(model)
    model.set_adapter("d1")
    layer = model.get_base_model().lin0
    layer.set_adapter("d2")  # behind the plan's back: this layer now holds d2, with its own backup
    model.set_adapter("d0")
    with torch.no_grad():
        assert torch.equal(model(X), alone(folders[0]))
    assert_holds_w0(model, w0)


def test_entries_replaced_through_load_state_dict_are_compiled_again(folders):
    model = load(folders)
    model.set_adapter("d1")
    model.set_adapter("d2")  # both compiled
    state = model.state_dict()
    key = "base_model.model.lin0.rst_weight.d1.weight"
    state[key] = state[key].clone()
    state[key][0, 0] += 1.0  # one more changed entry for d1
    model.load_state_dict(state)
    model.set_adapter("d1")
    assert torch.equal(bits(model.get_base_model().lin0.base_layer.weight), bits(state[key]))


def test_entries_replaced_in_place_are_compiled_again(folders):
    model = load(folders)
    model.set_adapter("d1")
    model.set_adapter("d2")  # both compiled
    layer = model.get_base_model().lin1
    entries = layer.rst_sparse["d1"]["weight"]
    layer.load_sparse("d1", {**layer.rst_sparse["d1"], "weight": entries._replace(values=entries.values + 1)})
    model.set_adapter("d1")
    patched = bits(layer.base_layer.weight)[entries.indices.long()]
    assert torch.equal(patched, bits(entries.values + 1))


def test_loaded_adapter_nbytes_counts_the_entries_and_their_compiled_copy(folders):
    model = load(folders)
    tuner = model.base_model
    # the reference: the changed entries in each file (head excluded: modules_to_save keeps a dense copy)
    files = [load_file(f / "adapter_model.safetensors") for f in folders]
    entries = [sum(t.numel() for k, t in f.items() if k.endswith(".val") and "head" not in k) for f in files]
    sparse = [sum(m.rst_sparse.nbytes(f"d{i}") for m in model.modules() if isinstance(m, RSTLayer)) for i in range(3)]
    assert [tuner.loaded_adapter_nbytes(f"d{i}") for i in range(3)] == sparse  # nothing compiled yet
    model.set_adapter("d1")  # compiles every loaded adapter: + an int32 position and the fp32 w0 per entry
    assert [tuner.loaded_adapter_nbytes(f"d{i}") for i in range(3)] == [s + 8 * n for s, n in zip(sparse, entries)]
    # the layers' values became views of the plan's one copy (so they are not counted twice)
    compiled = tuner._switch_plan._compiled["d2"]
    ((_, _, plan_values, _),) = compiled.writes
    layer_values = [e.values for m in model.modules() if isinstance(m, RSTLayer) for e in m.rst_sparse["d2"].values()]
    start, end = plan_values.data_ptr(), plan_values.data_ptr() + plan_values.nbytes
    assert all(start <= v.data_ptr() < end for v in layer_values if v.numel())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'nope' is not a loaded inference adapter.*load_adapter"):
        tuner.loaded_adapter_nbytes("nope")
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_a_parameter_the_plan_cannot_lay_out_is_switched_layer_by_layer(folders, monkeypatch):
    """What a GPU tensor, a DTensor or shared memory meets: the plan leaves that parameter where it is, and the
    adapters that change it switch layer by layer, from w0, bit for bit."""
    from peft_rst import switch_plan

    movable = switch_plan._movable
    monkeypatch.setattr(switch_plan, "_movable", lambda base: movable(base) and tuple(base.shape) != (8, 16))
    model = load(folders)
    w0 = w0_of(model)
    expected = [alone(f) for f in folders]
    for name in ("d1", "d2", "d0", "d2"):
        model.set_adapter(name)
        with torch.no_grad():
            assert torch.equal(model(X), expected[int(name[1])]), name
    plan = model.base_model._switch_plan
    assert plan is not None and not plan._compiled  # every adapter changes lin1.weight: none is compiled
    (flat,) = plan.flat.values()
    lin1 = model.get_base_model().lin1.base_layer.weight
    start, end = flat.data_ptr(), flat.data_ptr() + flat.nbytes
    assert not start <= lin1.data_ptr() < end  # left in place
    assert_holds_w0(model, w0)
