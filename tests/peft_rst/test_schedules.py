"""Reset schedules and variants: constant tau, growing tau (appendix J), keep-top-r (appendix M), RST_bias.

To check the threshold applied at step t, an "optimizer" writes W = w0 + d with |d| at known multiples of the
threshold the schedule should have reached (written here from the appendix, not taken from peft_rst), and the test
checks which entries the automatic reset put back.
"""

from __future__ import annotations

import math

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_rst import RSTConfig

# multiples of the expected threshold; none within 1e-3 of 1, so float32 rounding cannot blur the boundary
FACTORS = torch.tensor([0.3, 0.6, 0.9, 0.97, 1.03, 1.1, 1.4, 2.0, 3.0, 5.0], dtype=torch.float64)


class Assign(torch.optim.Optimizer):
    """A stand-in optimizer whose step writes prescribed values into its parameters (a real `optimizer.step()`)."""

    def __init__(self, params) -> None:
        super().__init__(list(params), {})
        self.values: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for p, v in zip(self.param_groups[0]["params"], self.values):
            p.copy_(v)


def _linear_model(*shapes: tuple[int, int]) -> nn.Module:
    layers = [nn.Linear(i, o, bias=False) for i, o in shapes]
    return nn.Sequential(*layers)


def tau_linear(t: int, tau: float, tau_end: float, steps: int) -> float:
    return tau + (tau_end - tau) * min(t, steps) / steps


def tau_exponential(t: int, tau: float, tau_end: float, steps: int) -> float:
    return tau * (tau_end / tau) ** (min(t, steps) / steps)


@pytest.mark.parametrize(
    "schedule, expected",
    [
        ("constant", lambda t: 1e-3),
        ("linear", lambda t: tau_linear(t, 1e-3, 5e-3, 4)),
        ("exponential", lambda t: tau_exponential(t, 1e-3, 1e-1, 4)),
    ],
)
def test_threshold_applied_at_each_step(rst_tools, schedule, expected):
    kwargs = {"tau_schedule": schedule, "schedule_steps": 4}
    if schedule == "linear":
        kwargs["tau_end"] = 5e-3
    elif schedule == "exponential":
        kwargs["tau_end"] = 1e-1
    else:
        kwargs.pop("schedule_steps")
    model = get_peft_model(_linear_model((10, 10)), RSTConfig(tau=1e-3, **kwargs))
    ((name, w),) = rst_tools.adapter_weights(model).items()
    w0 = rst_tools.base_weights(model)[name].detach()
    opt = Assign([w])
    g = torch.Generator().manual_seed(0)

    for t in range(1, 7):  # two steps past the end of the schedule: tau is held at tau_end
        tau_t = expected(t)
        factors = FACTORS[torch.randint(0, len(FACTORS), w.shape, generator=g)]
        signs = torch.randint(0, 2, w.shape, generator=g).double() * 2 - 1
        target = (w0.double() + signs * factors * tau_t).float()
        opt.values = [target]
        opt.step()
        moved = (target.double() - w0.double()).abs()  # the delta the reset actually saw, exactly
        assert ((moved / tau_t - 1).abs() > 1e-4).all()
        reset = moved <= tau_t
        assert 0 < reset.sum() < reset.numel()
        assert torch.equal(w[reset], w0[reset]), f"step {t}: entries within tau={tau_t:g} were not reset"
        assert torch.equal(w[~reset], target[~reset]), f"step {t}: entries beyond tau={tau_t:g} were reset"
        assert model.base_model.reset_step() == t


def test_schedule_resumes_from_set_reset_step(rst_tools):
    """After `set_reset_step(k)` (resuming a run), the next step applies tau of step k + 1."""
    config = RSTConfig(tau=1e-3, tau_end=1e-1, tau_schedule="exponential", schedule_steps=10)
    model = get_peft_model(_linear_model((8, 8)), config)
    model.base_model.set_reset_step(6)
    ((name, w),) = rst_tools.adapter_weights(model).items()
    w0 = rst_tools.base_weights(model)[name].detach()
    tau_7, tau_6 = tau_exponential(7, 1e-3, 1e-1, 10), tau_exponential(6, 1e-3, 1e-1, 10)
    half = torch.arange(w.numel()).view(w.shape) % 2 == 0
    # entries between tau_6 and tau_7 are reset only if step 7's threshold is used
    target = torch.where(half, w0 + 0.5 * (tau_6 + tau_7), w0 + 2 * tau_7)
    opt = Assign([w])
    opt.values = [target]
    opt.step()
    assert model.base_model.reset_step() == 7
    assert torch.equal(w[half], w0[half])
    assert torch.equal(w[~half], target[~half])


def _keep_top_expected(step: int, r0: float, r1: float, steps: int, kind: str, total: int) -> int:
    p = min(step, steps) / steps
    r = r0 + (r1 - r0) * p if kind == "linear" else r0 * (r1 / r0) ** p
    assert abs(r * total - math.floor(r * total) - 0.5) > 0.05, "pick ratios whose count is not a rounding tie"
    return round(r * total)


@pytest.mark.parametrize("kind", ["linear", "exponential"])
def test_keep_top_r_keeps_exactly_the_largest_changes(rst_tools, kind):
    """Top-r mode ranks |W - w0| globally over all targeted entries (two layers here) and keeps the top r."""
    r0, r1, steps = 0.5, 0.06, 4
    model = get_peft_model(
        _linear_model((25, 20), (20, 25)),
        RSTConfig(keep_ratio=r0, keep_ratio_end=r1, keep_ratio_schedule=kind, schedule_steps=steps),
    )
    weights = rst_tools.adapter_weights(model)
    bases = rst_tools.base_weights(model)
    names = sorted(weights)
    total = sum(weights[n].numel() for n in names)
    opt = Assign([weights[n] for n in names])
    g = torch.Generator().manual_seed(0)

    for t in range(1, steps + 2):
        # distinct magnitudes 1e-4 ... 1e-1 spread over both layers at random
        magnitudes = (torch.randperm(total, generator=g).double() + 1) * 1e-4
        signs = torch.randint(0, 2, (total,), generator=g).double() * 2 - 1
        deltas = (magnitudes * signs).split([weights[n].numel() for n in names])
        targets = [(bases[n].double() + d.view(bases[n].shape)).float() for n, d in zip(names, deltas)]
        opt.values = targets
        opt.step()

        moved = torch.cat([(tg.double() - bases[n].double()).abs().view(-1) for n, tg in zip(names, targets)])
        k = _keep_top_expected(t, r0, r1, steps, kind, total)
        kept_expected = torch.zeros(total, dtype=torch.bool)
        kept_expected[torch.topk(moved, k).indices] = True
        kept = torch.cat([(weights[n] != bases[n]).view(-1) for n in names])
        assert torch.equal(kept, kept_expected), f"step {t}: kept {int(kept.sum())} entries, expected the top {k}"
        for n, tg in zip(names, targets):
            survived = weights[n] != bases[n]
            assert torch.equal(weights[n][survived], tg[survived])
            assert torch.equal(weights[n][~survived], bases[n][~survived])


def test_bias_only_variant_trains_through_all_weights_but_keeps_only_biases(rst_tools):
    """RST_bias: gradients reach every parameter (they enter clipping / momentum), only bias entries survive."""
    base = rst_tools.MLP()
    reference = rst_tools.twin(base)
    model = get_peft_model(base, RSTConfig(bias_only=True))
    manual_w0 = {n: p.detach().clone() for n, p in reference.named_parameters()}
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)

    def manual_reset():
        with torch.no_grad():
            for n, p in reference.named_parameters():
                if not n.endswith("bias"):
                    p.copy_(manual_w0[n])

    data = rst_tools.batches(4, rst_tools.mlp_batch)
    x, y = data[0]
    nn.functional.cross_entropy(model(x), y).backward()
    for name, w in rst_tools.adapter_weights(model).items():
        assert w.grad is not None and w.grad.count_nonzero() > 0, f"{name} gets no gradient"
    opt.zero_grad()

    rst_tools.run_steps(model, opt, data)
    rst_tools.run_steps(reference, ref_opt, data, after_step=manual_reset)
    rst_tools.assert_matches_reference(model, reference)
    bases = rst_tools.base_weights(model)
    for name, w in rst_tools.adapter_weights(model).items():
        if name.endswith("bias"):
            assert (w != bases[name]).all(), name
        else:
            assert rst_tools.bitwise_equal(w, bases[name]), name
