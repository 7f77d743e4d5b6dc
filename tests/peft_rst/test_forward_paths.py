"""RST's eager forward and reset shortcuts give exactly what the general mechanisms give.

`RSTLayer.forward` runs a hook-free Linear / LayerNorm as the functional op with W, any other module with W swapped
into its `_parameters`, and modules whose own parameters a submodule holds too (ties) through
`torch.func.functional_call`. The references here
are independent: the plain module with its weight replaced by W through `functional_call`, and the reset written
as `torch.where(|W - w0| <= tau, w0, W)` per tensor.
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn
from torch.func import functional_call

import peft_rst
from peft_rst.reset import ResetTarget, reset_all_below_threshold_


class LinearSubclass(nn.Linear):
    """A Linear whose forward differs from nn.Linear's: RST must run it, not F.linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + self.weight.sum()


class Owner(nn.Module):
    """Owns a bare parameter and has a child: the functional_call path."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))
        self.inner = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale


MODULES = {
    "linear": lambda: nn.Linear(8, 8),
    "linear_no_bias": lambda: nn.Linear(8, 8, bias=False),
    "layer_norm": lambda: nn.LayerNorm(8),
    "linear_subclass": lambda: LinearSubclass(8, 8),
    "conv1d": lambda: nn.Conv1d(8, 8, 1),
    "gpt2_conv1d": lambda: __import__("transformers.pytorch_utils", fromlist=["Conv1D"]).Conv1D(8, 8),
}


class Net(nn.Module):
    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.channels_first = isinstance(body, nn.Conv1d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            return self.body(x.transpose(1, 2)).transpose(1, 2)
        return self.body(x)


def _perturbed_rst(body: nn.Module, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, nn.Module, dict]:
    """(plain twin of `body`, RST model around `body` with W != w0, {name: W}) in `dtype`."""
    torch.manual_seed(0)
    reference = Net(body).to(dtype)
    model = get_peft_model(Net(body).to(dtype), peft_rst.RSTConfig(init_weights=False))
    layer = next(m for m in model.modules() if isinstance(m, peft_rst.RSTLayer))
    return reference, model, dict(layer.rst_weight["default"].items())


def _reference_call(reference: nn.Module, weights: dict, x: torch.Tensor) -> torch.Tensor:
    """The plain module with its own parameters replaced by W (cast to its dtype), through functional_call."""
    params = {f"body.{name}": w.to(dict(reference.body.named_parameters())[name].dtype) for name, w in weights.items()}
    return functional_call(reference, params, (x,))


@pytest.mark.parametrize("kind", sorted(MODULES))
def test_forward_and_gradient_equal_functional_call(kind):
    reference, model, weights = _perturbed_rst(MODULES[kind]())
    x = torch.randn(3, 5, 8, requires_grad=True)
    out = model(x)
    expected = _reference_call(reference, weights, x)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.square().sum(), [x, *weights.values()])
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *weights.values()])
    for got, want in zip(grads, expected_grads):
        assert torch.equal(got, want)
    # the base module holds w0 again after the call
    for name, p in model.base_model.model.body.base_layer.named_parameters():
        assert torch.equal(p, dict(reference.body.named_parameters())[name]) and not torch.equal(p, weights[name])


def test_module_with_children_and_bare_parameter():
    """CLIP's embeddings kind: a module owning a bare parameter whose child is wrapped too (functional_call path)."""
    torch.manual_seed(0)
    reference = Net(Owner())
    model = get_peft_model(Net(Owner()), peft_rst.RSTConfig(init_weights=False))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft_rst.RSTLayer)}
    assert sorted(layers) == ["base_model.model.body", "base_model.model.body.base_layer.inner"]
    params = {}
    for name, layer in layers.items():
        prefix = name.removeprefix("base_model.model.").replace("base_layer.", "")
        params.update({f"{prefix}.{k}": w for k, w in layer.rst_weight["default"].items()})
    x = torch.randn(4, 8)
    out = model(x)
    expected = functional_call(reference, params, (x,))
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out.sum(), list(params.values()))
    for got, want in zip(grads, torch.autograd.grad(expected.sum(), list(params.values()))):
        assert torch.equal(got, want)


class TiedOwner(nn.Module):
    """Owns a parameter that its (unwrapped) child holds too: only functional_call re-parametrises both."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(8))
        self.inner = nn.Module()
        self.inner.scale = self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.inner.scale.sum()


def test_module_whose_parameter_a_child_holds_too():
    torch.manual_seed(0)
    reference = Net(TiedOwner())
    torch.manual_seed(0)
    model = get_peft_model(Net(TiedOwner()), peft_rst.RSTConfig(init_weights=False, exclude_modules=["inner"]))
    layers = {n: m for n, m in model.named_modules() if isinstance(m, peft_rst.RSTLayer)}
    assert sorted(layers) == ["base_model.model.body"]
    w = layers["base_model.model.body"].rst_weight["default"]["scale"]
    x = torch.randn(4, 8)
    out = model(x)
    expected = functional_call(reference, {"body.scale": w}, (x,))  # ties: inner.scale is W as well
    assert torch.equal(out, expected)
    assert torch.equal(torch.autograd.grad(out.sum(), [w])[0], torch.autograd.grad(expected.sum(), [w])[0])


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), lambda: torch.randn(2, 3, 6, 6)),
        (lambda: nn.Embedding(10, 4, padding_idx=0), lambda: torch.tensor([[0, 3, 9], [1, 1, 2]])),
        (lambda: nn.Embedding(10, 4, max_norm=0.5), lambda: torch.tensor([[0, 3, 9], [1, 1, 2]])),
    ],
    ids=["conv2d", "embedding", "embedding_max_norm"],
)
def test_direct_conv2d_and_embedding_equal_functional_call(make, x):
    reference, model, weights = _perturbed_rst(make())
    x = x()
    out = model(x)
    w = weights["weight"].detach().clone()  # max_norm renormalises the weight in place: give the reference W as it was
    expected = _reference_call(reference, {**weights, "weight": w.requires_grad_()}, x)
    assert torch.equal(out, expected) and torch.equal(weights["weight"], w)
    assert torch.equal(
        torch.autograd.grad(out.sum(), [weights["weight"]])[0], torch.autograd.grad(expected.sum(), [w])[0]
    )


@pytest.mark.parametrize("kind", ["linear", "layer_norm"])
def test_hooks_on_the_base_layer_run_and_see_w(kind):
    """With a hook, the module itself runs (hooks fire) with W in place of its parameters."""
    reference, model, weights = _perturbed_rst(MODULES[kind]())
    base = model.base_model.model.body.base_layer
    seen = []
    handle = base.register_forward_hook(lambda module, args, out: seen.append(module.weight))
    pre = base.register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    x = torch.randn(2, 8)
    out = model(x)
    handle.remove()
    pre.remove()
    assert seen and seen[0] is weights["weight"]
    assert torch.equal(out, _reference_call(reference, weights, x * 3))
    assert base.weight is not weights["weight"]


def test_global_module_hooks_disable_the_direct_op():
    reference, model, weights = _perturbed_rst(MODULES["linear"]())
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: calls.append(type(m).__name__))
    try:
        model(torch.randn(2, 8))
    finally:
        handle.remove()
    assert "Linear" in calls  # the base Linear ran as a module, so the global hook saw it


def test_base_parameters_are_restored_when_the_base_forward_raises():
    _, model, weights = _perturbed_rst(MODULES["linear_subclass"]())
    base = model.base_model.model.body.base_layer
    before = {n: p for n, p in base._parameters.items()}
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7))  # wrong width
    assert {n: p for n, p in base._parameters.items()} == before


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_base_with_fp32_w(dtype):
    """peft keeps W in fp32 for a half-precision base; the forward casts it, as functional_call of the cast W."""
    reference, model, weights = _perturbed_rst(nn.Linear(8, 8), dtype)
    assert all(w.dtype == torch.float32 for w in weights.values())
    x = torch.randn(3, 8, dtype=dtype)
    assert torch.equal(model(x), _reference_call(reference, weights, x))


def test_two_active_trainable_adapters_add_their_deltas():
    reference, model, weights = _perturbed_rst(nn.Linear(8, 8))
    model.add_adapter("other", peft_rst.RSTConfig(init_weights=False))
    layer = model.base_model.model.body
    with torch.no_grad():
        for w in layer.rst_weight["other"].values():
            w.mul_(1.5)
    layer.set_adapter(["default", "other"])
    bases = dict(reference.body.named_parameters())
    effective = {n: bases[n] + (weights[n] - bases[n]) + (layer.rst_weight["other"][n] - bases[n]) for n in weights}
    x = torch.randn(2, 8)
    assert torch.equal(model(x), _reference_call(reference, effective, x))


# ------------------------------------------------------------------------------------------------------- reset
def _where_reference(w: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    b = b.to(w.dtype)
    return torch.where((w - b).abs() <= tau, b, w)


@pytest.mark.parametrize(
    "w_dtype,b_dtype",
    [
        (torch.float32, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float64, torch.float64),
    ],
)
def test_batched_reset_equals_where_bit_for_bit(w_dtype, b_dtype):
    """Small tensors (batched, batches crossing the batch size), large ones (chunked), empty ones, special values."""
    g = torch.Generator().manual_seed(3)
    shapes = [(3,), (0,), (64, 64), (1,), (300, 300), (257,), (1 << 16,), (1 << 16, 2)] + [(40, 40)] * 50
    tau = 2.0**-6  # exactly representable in every dtype, so that |W - w0| == tau happens exactly
    targets, expected = [], []
    for shape in shapes:
        base = torch.randn(shape, generator=g).to(b_dtype)
        noise = torch.randn(shape, generator=g) * tau * torch.randint(0, 3, shape, generator=g)
        weight = (base.to(w_dtype) + noise.to(w_dtype)).contiguous()
        flat = weight.view(-1)
        if flat.numel() >= 8:  # exactly tau away (reset), 2 tau away (kept), inf, nan, -0.0 against +0.0
            base.view(-1)[0], base.view(-1)[4], base.view(-1)[3] = 1.0, 1.0, 0.0
            flat[0], flat[4] = 1.0 + tau, 1.0 + 2 * tau
            flat[1], flat[2], flat[3] = float("inf"), float("nan"), -0.0
            assert (flat[0] - base.view(-1)[0].to(w_dtype)).abs() == tau
        expected.append(_where_reference(weight, base, tau))
        if flat.numel() >= 8:
            assert expected[-1].view(-1)[0] == 1.0 and expected[-1].view(-1)[4] == 1.0 + 2 * tau
        targets.append(ResetTarget(weight=nn.Parameter(weight, requires_grad=True), base=base, is_bias=False))
    reset_all_below_threshold_(targets, tau)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[torch.finfo(w_dtype).bits // 8]
    for t, want in zip(targets, expected):
        assert t.weight.dtype == w_dtype
        assert torch.equal(t.weight.detach().view(bits), want.view(bits))


def test_batched_reset_leaves_integer_weights_as_where_does():
    base = torch.arange(10)
    weight = base + torch.tensor([0, 1, 2, 0, 0, 5, 0, 0, 0, 1])
    expected = _where_reference(weight, base, 1.0)
    reset_all_below_threshold_([ResetTarget(weight=weight, base=base, is_bias=False)], 1.0)
    assert torch.equal(weight, expected)
