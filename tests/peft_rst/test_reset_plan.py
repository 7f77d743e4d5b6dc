"""The cached reset plan (peft_rst.reset_plan): bit-exact, W in separate storages, rebuilt when the model changes."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from peft_rst import RSTConfig
from peft_rst.reset import ResetTarget, current_plan
from peft_rst.reset_plan import _PLAN_CHUNK_MAX, _PLAN_CHUNK_PER_THREAD, ResetPlan, _reset_bits_, _tau_bits

BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16}


def _where_reference(w: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.where((w - b.to(w.dtype)).abs() <= tau, b.to(w.dtype), w)


def _special(n: int, dtype: torch.dtype, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """w0 and W differing by 0, tiny, about tau and large amounts, with nan, inf, -0.0 and subnormals mixed in."""
    b = torch.randn(n, generator=g, dtype=torch.float64)
    scale = torch.tensor([0.0, 1e-8, 1e-7, 1e-6, 1e-3, 1.0], dtype=torch.float64)
    w = b + torch.randn(n, generator=g, dtype=torch.float64) * scale[torch.randint(0, 6, (n,), generator=g)]
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-45, -1e-45], dtype=torch.float64)
    k = n // 4
    w[:k] = special[torch.randint(0, len(special), (k,), generator=g)]
    b[k // 2 : k + k // 2] = special[torch.randint(0, len(special), (k,), generator=g)]
    return w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tau", [0.0, -0.0, 1e-7, 1e-6, 3e-6, 2.0**-6, 0.1, float("inf")])
def test_integer_compare_matches_where(dtype, tau):
    w, b = _special(5000, dtype, torch.Generator().manual_seed(0))
    w[-10:], b[-10:] = torch.tensor(tau, dtype=dtype) if tau != float("inf") else 1.0, 0.0  # exactly tau away
    expected = _where_reference(w, b, tau)
    bits = BITS[dtype]
    d = torch.empty_like(w)
    _reset_bits_(w, w.view(bits), b, b.view(bits), d, d.view(bits), _tau_bits(tau, dtype, bits))
    assert torch.equal(w.view(BITS[dtype]), expected.view(BITS[dtype]))


def plan_chunk_for(threads: int) -> int:
    return min(_PLAN_CHUNK_PER_THREAD * threads, _PLAN_CHUNK_MAX)


def _targets(shapes, dtype, g):
    targets, expected = [], []
    for shape in shapes:
        n = torch.Size(shape).numel()
        w, b = _special(n, dtype, g)
        w, b = w.view(shape), b.view(shape)
        expected.append(_where_reference(w, b, 1e-6))
        weights, bases = {"p": nn.Parameter(w.clone())}, {"p": nn.Parameter(b, requires_grad=False)}
        targets.append(
            ResetTarget(weights["p"], bases["p"], is_bias=False, weight_owner=weights, base_owner=bases, name="p")
        )
    return targets, expected


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_plan_reset_is_bit_exact_and_keeps_separate_storages(dtype, threads, tmp_path):
    # small tensors batched (crossing the batch size), large ones chunked across chunk boundaries, odd sizes; the
    # chunk size follows the thread count the plan is built with
    shapes = [(3,), (64, 64), (1,), (300, 300), (257,), (1 << 16,), (1 << 16, 2), (1 << 17, 3)] + [(40, 40)] * 50
    targets, expected = _targets(shapes, dtype, torch.Generator().manual_seed(1))
    before = [t.weight.detach().clone() for t in targets]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plan = ResetPlan(layers=[], targets=targets)
    finally:
        torch.set_num_threads(previous)
    chunk = plan_chunk_for(threads)
    assert max(w.numel() for w, _, _ in plan.chunks) == chunk  # the largest tensor spans several whole chunks
    for t, old in zip(targets, before):  # packing moves W, it does not change it
        assert torch.equal(t.weight.detach().view(BITS[dtype]), old.view(BITS[dtype]))
    plan.reset(1e-6)
    for t, want in zip(targets, expected):
        assert torch.equal(t.weight.detach().view(BITS[dtype]), want.view(BITS[dtype]))
    # every W keeps a storage of its own: safetensors saves and loads them (it refuses shared storages)
    tensors = {f"w{i}": t.weight.detach() for i, t in enumerate(targets)}
    assert len({w.untyped_storage().data_ptr() for w in tensors.values()}) == len(tensors)
    save_file(tensors, tmp_path / "w.safetensors")
    loaded = load_file(tmp_path / "w.safetensors")
    assert all(torch.equal(loaded[k].view(BITS[dtype]), v.view(BITS[dtype])) for k, v in tensors.items())


def test_plan_is_rebuilt_when_the_model_replaces_w0_or_w():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    layer = model.base_model.model[0]
    w = layer.rst_weight["default"]["weight"]
    opt.step()  # builds the plan
    # a new w0 object (load_state_dict(assign=True) does this): the next reset compares with it
    new_base = nn.Parameter(layer.base_layer.weight.detach() + 1.0, requires_grad=False)
    layer.base_layer.weight = new_base
    with torch.no_grad():
        w.copy_(new_base + 1e-4)
    opt.step()
    assert torch.equal(w.detach(), new_base.detach())
    # W's data replaced in place of the same parameter (what a dtype cast or .to() does): still reset
    w.data = (new_base.detach() + 5e-4).clone()
    opt.step()
    assert torch.equal(w.detach(), new_base.detach())


def test_a_copy_does_not_carry_the_plan_s_buffers():
    import copy

    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    group = model.base_model._reset_groups["default"]
    assert current_plan(group) is not None and group.plan is not None
    twin = copy.deepcopy(model)
    assert twin.base_model._reset_groups["default"].plan is None  # rebuilt from the copy's own tensors when needed
    w, w_twin = (m.base_model.model[0].rst_weight["default"]["weight"] for m in (model, twin))
    assert torch.equal(w, w_twin) and w.data_ptr() != w_twin.data_ptr()


def test_w_is_made_in_the_plan_s_buffer_at_injection(tmp_path):
    """No copy of W into the plan's buffer: W is made there (the copy's freed first storages stayed in RSS)."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    body[1].weight.data = body[1].weight.data.double()  # a second dtype: a buffer of its own
    model = get_peft_model(body, RSTConfig(tau=1e-3, init_weights=False))
    group = model.base_model._reset_groups["default"]
    assert group.plan is None  # W lies in its buffer already: nothing to move, the plan is built when first needed
    weights = [w for m in model.base_model.model for w in m.rst_weight["default"].values()]
    made_at = [w.data_ptr() for w in weights]
    plan = current_plan(group)
    assert [w.data_ptr() for w in weights] == made_at  # the plan found W where injection made them
    assert plan is not None and not plan.rest and len(weights) == 6
    assert len({w.untyped_storage().data_ptr() for w in weights}) == len(weights)  # storages of their own
    ends = {}
    for w in sorted(weights, key=lambda w: w.data_ptr()):  # back to back per dtype
        if w.dtype in ends:
            assert w.data_ptr() == ends[w.dtype]
        ends[w.dtype] = w.data_ptr() + w.numel() * w.element_size()
    bases = [b for m in model.base_model.model for b in m.base_layer.parameters()]
    assert all(not torch.equal(w, b) for w, b in zip(weights, bases))  # init_weights=False perturbed the copies
    save_file({f"w{i}": w.detach() for i, w in enumerate(weights)}, tmp_path / "w.safetensors")


def test_an_optimizer_of_other_parameters_leaves_the_rst_model_alone(monkeypatch):
    """The reset hooks run for every optimizer in the process; one that holds no W neither resets nor walks the
    RST layers (which would cost every other optimizer a pass over the model), and the RST optimizer still resets."""
    from peft_rst.layer import RSTLayer

    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    rst_opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    other = nn.Linear(4, 4)
    other_opt = torch.optim.SGD(other.parameters(), lr=0.1, momentum=0.9)
    for opt, module, x in ((rst_opt, model, torch.randn(3, 8)), (other_opt, other, torch.randn(3, 4))):
        module(x).sum().backward()
        opt.step()  # both now hold optimizer state
    tuner = model.base_model
    w = tuner.model[0].rst_weight["default"]["weight"]
    before, step = w.detach().clone(), tuner.reset_step()

    calls, checks = [], []
    original, valid = RSTLayer.reset_targets, ResetPlan.valid
    monkeypatch.setattr(RSTLayer, "reset_targets", lambda self, name: calls.append(name) or original(self, name))
    monkeypatch.setattr(ResetPlan, "valid", lambda self, layers: checks.append(self) or valid(self, layers))
    other(torch.randn(3, 4)).sum().backward()
    other_opt.step()
    assert calls == [] and tuner.reset_step() == step and torch.equal(w.detach(), before)
    plan = tuner._reset_groups["default"].plan
    assert checks.count(plan) == 1  # checked before the step; the step after it trusts that check
    assert "rst_reset_step" not in other_opt.state[other.weight]

    with torch.no_grad():  # W moves by less than tau: the RST optimizer's step puts w0 back
        w.copy_(tuner.model[0].base_layer.weight + 1e-4)
    rst_opt.zero_grad()
    rst_opt.step()
    assert torch.equal(w.detach(), tuner.model[0].base_layer.weight) and tuner.reset_step() == step + 1
    assert all(rst_opt.state[p]["rst_reset_step"] == step + 1 for p in rst_opt.param_groups[0]["params"])


def test_the_step_is_recorded_into_a_replaced_optimizer_state():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(2):
        model(torch.randn(3, 8)).sum().backward()
        opt.step()
    del opt.state[params[0]]  # a state dropped by hand: the next step writes into the new one
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    assert [opt.state[p]["rst_reset_step"] for p in params] == [3] * len(params)
    opt.load_state_dict(opt.state_dict())  # a loaded state replaces the state object
    opt.step()
    assert [opt.state[p]["rst_reset_step"] for p in params] == [4] * len(params)


def test_w_made_outside_a_flat_buffer_moves_at_injection(monkeypatch):
    """W that the plan must move into its buffer move when the adapter is injected, before the gradients and the
    optimizer state exist (moving at the first step would raise its peak by a copy of W)."""
    from peft_rst.model import RSTModel

    monkeypatch.setattr(RSTModel, "_take", lambda self, base: None)  # every W a clone of its own
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    plan = model.base_model._reset_groups["default"].plan
    assert plan is not None and not plan.rest and len(plan.targets) == 4


def _trained_tower():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)), RSTConfig(tau=1e-3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    return model, opt


def test_small_w0_are_laid_out_in_w_order_and_read_in_place(tmp_path):
    """w0 of small tensors move once into a flat buffer in W's order (same objects, same values, storages of their
    own), so no chunk gathers them; a rebuilt plan finds them there, and an in-place write to w0 is seen."""
    model, opt = _trained_tower()
    bases = [b for m in model.base_model.model for b in m.base_layer.parameters()]
    values = [b.detach().clone() for b in bases]
    plan = current_plan(model.base_model._reset_groups["default"])
    assert all(torch.equal(b, v) for b, v in zip(bases, values))
    assert all(not isinstance(b, list) for _, b, _ in plan.chunks)  # nothing to gather
    by_w = sorted(plan.targets, key=lambda t: t.weight.data_ptr())
    for before, after in zip(by_w, by_w[1:]):  # back to back in W's order
        assert after.base.data_ptr() == before.base.data_ptr() + before.base.numel() * before.base.element_size()
    assert len({b.untyped_storage().data_ptr() for b in bases}) == len(bases)
    save_file({f"b{i}": b.detach() for i, b in enumerate(bases)}, tmp_path / "w0.safetensors")

    where = [b.data_ptr() for b in bases]
    model.base_model._reset_groups["default"].plan = None
    current_plan(model.base_model._reset_groups["default"])
    assert [b.data_ptr() for b in bases] == where  # not moved again

    layer = model.base_model.model[0]
    with torch.no_grad():
        layer.base_layer.weight.add_(1.0)  # w0 edited in place (load_state_dict does this)
        layer.rst_weight["default"]["weight"].copy_(layer.base_layer.weight + 1e-4)
    opt.step()
    assert torch.equal(layer.rst_weight["default"]["weight"], layer.base_layer.weight)


def test_w0_sharing_its_storage_is_not_moved():
    """A w0 whose storage another tensor shares (a parameter made over the same storage) keeps it: moving it would
    untie them. Its batch gathers w0 instead, and the reset is the same."""
    model, opt = _trained_tower()
    layer = model.base_model.model[0]
    twin = nn.Parameter(layer.base_layer.weight.data, requires_grad=False)
    plan = current_plan(model.base_model._reset_groups["default"])
    assert twin.data_ptr() == layer.base_layer.weight.data_ptr()
    assert any(isinstance(b, list) for _, b, _ in plan.chunks)
    w = layer.rst_weight["default"]["weight"]
    with torch.no_grad():
        w.copy_(twin + 1e-4)
    opt.step()
    assert torch.equal(w, twin)
