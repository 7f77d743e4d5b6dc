"""CMKD loss and config, checked against independent float64 hand computations (explicit loops / numpy)."""

import json
import math

import numpy as np
import pytest
import torch

from cmkd.config import CMKDConfig
from cmkd.loss import CMKDLoss, cmkd_alpha, fixmatch_loss, gini_impurity, warmup_lambda

RTOL, ATOL = 1e-5, 1e-6


# ----------------------------------------------------------------------------------------------------------------
# Hand-written references (float64, loops; they never call the code under test)
# ----------------------------------------------------------------------------------------------------------------
def ref_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    out = np.zeros_like(z)
    for i in range(z.shape[0]):
        e = np.exp(z[i] - z[i].max())
        out[i] = e / e.sum()
    return out


def ref_gini(P, w, mode):
    B, C = P.shape
    if mode == "mean":
        return sum(w[i] * (1.0 - sum(P[i, c] ** 2 for c in range(C))) for i in range(B)) / B
    S = [sum(P[i, c] for i in range(B)) for c in range(C)]
    return sum(w[i] * (1.0 - sum(P[i, c] ** 2 / S[c] for c in range(C))) for i in range(B))


def ref_kl(a, b):
    return sum(a[c] * (math.log(a[c]) - math.log(b[c])) for c in range(len(a)))


def ref_alpha(P, Q, mode="kl", direction="teacher_student", fixed=0.5):
    out = []
    for i in range(P.shape[0]):
        if mode == "fixed":
            out.append(fixed)
        elif mode == "entropy":
            out.append(math.exp(sum(P[i, c] * math.log(P[i, c]) for c in range(P.shape[1]))))
        else:
            kl = ref_kl(Q[i], P[i]) if direction == "teacher_student" else ref_kl(P[i], Q[i])
            # Spec: alpha stays in [0, 1]. The KL is clipped at 0, which only matters for sub-distributions
            # (active classes without renormalisation), where the restricted sum can go negative.
            out.append(math.exp(-max(kl, 0.0)))
    return np.array(out)


def ref_lambda(t, gamma, max_iter):
    t = min(t, max_iter)
    return 2.0 / (1.0 + math.exp(-gamma * t / max_iter)) - 1.0


def ref_ce(z, y, smoothing=0.0):
    logp = np.log(ref_softmax(z))
    C = z.shape[1]
    total = 0.0
    for i in range(z.shape[0]):
        total += (1 - smoothing) * -logp[i, y[i]] + smoothing * sum(-logp[i, c] for c in range(C)) / C
    return total / z.shape[0]


def ref_total(zs, gs, y, zt, gt, step, cfg: CMKDConfig, active=None):
    """Independent re-derivation of the release objective from config.py's docstring."""
    zs, gs, zt, gt = (np.asarray(a, dtype=np.float64) for a in (zs, gs, zt, gt))
    if active is None:
        P, Q = ref_softmax(zt), ref_softmax(gt)
    elif cfg.partial_renormalize:
        P, Q = ref_softmax(zt[:, active]), ref_softmax(gt[:, active])
    else:
        P, Q = ref_softmax(zt)[:, active], ref_softmax(gt)[:, active]
    lam = ref_lambda(step, cfg.gamma, cfg.warmup_max_iter)
    alpha = ref_alpha(P, Q, cfg.alpha_mode, cfg.kl_direction, cfg.fixed_alpha)
    task = ref_gini(P, alpha, cfg.gini)
    if cfg.distill_loss == "gini":
        distill = ref_gini(0.5 * (P + Q), 1 - alpha, cfg.gini)
    else:
        per = [(1 - alpha[i]) * ref_kl(Q[i], P[i]) for i in range(P.shape[0])]
        distill = sum(per) if cfg.gini == "balanced_sum" else sum(per) / len(per)
    w = cfg.transfer_weight
    terms = {
        "source_ce": cfg.cls_weight * ref_ce(zs, y, cfg.label_smoothing),
        "task": w * cfg.lambda1 * lam * task,
        "distill": w * cfg.lambda1 * lam * distill,
        "reg_source_ce": w * cfg.lambda2 * ref_ce(gs, y),
        "reg_teacher_gini": w * cfg.lambda3 * lam * ref_gini(Q, np.ones(len(Q)), cfg.gini),
    }
    terms["cmkd"] = terms["task"] + terms["distill"] + terms["reg_source_ce"] + terms["reg_teacher_gini"]
    return terms["source_ce"] + terms["cmkd"], terms, alpha, lam


def make_batch(seed=0, bs=3, bt=4, c=5, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(bs, c, generator=g) * scale
    gs = torch.randn(bs, c, generator=g) * scale
    y = torch.randint(0, c, (bs,), generator=g)
    zt = torch.randn(bt, c, generator=g) * scale
    gt = torch.randn(bt, c, generator=g) * scale
    return zs, gs, y, zt, gt


def close(actual, expected, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------------------------------
# Gini impurity
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["balanced_sum", "mean"])
@pytest.mark.parametrize("weighted", [False, True])
def test_gini_matches_hand_computation(mode, weighted):
    torch.manual_seed(0)
    logits = torch.randn(4, 3) * 2
    weights = torch.rand(4) if weighted else None
    P = ref_softmax(logits.numpy())
    w = weights.double().numpy() if weighted else np.ones(4)
    close(gini_impurity(torch.softmax(logits, 1), weights, mode), ref_gini(P, w, mode))


def test_gini_known_values():
    uniform = torch.full((2, 4), 0.25)
    one_hot = torch.eye(4)[:2]
    close(gini_impurity(uniform, mode="mean"), 0.75)  # 1 - 4 * (1/16)
    close(gini_impurity(one_hot, mode="mean"), 0.0)
    # balanced: S_c = 0.5 for every class -> each sample: 1 - 4 * (1/16) / 0.5 = 0.5, summed over 2 samples.
    close(gini_impurity(uniform, mode="balanced_sum"), 1.0)
    # A single sample is its own class mass: 1 - sum_c p_c = 0.
    close(gini_impurity(torch.tensor([[0.2, 0.3, 0.5]]), mode="balanced_sum"), 0.0)


def test_gini_balanced_class_mass_is_detached():
    torch.manual_seed(1)
    P = torch.softmax(torch.randn(4, 3), 1).double().requires_grad_()
    w = torch.rand(4, dtype=torch.float64)
    (grad,) = torch.autograd.grad(gini_impurity(P, w, "balanced_sum"), P)

    Pn, wn = P.detach().numpy(), w.numpy()
    S = Pn.sum(0)
    detached = np.zeros_like(Pn)
    through_s = np.zeros_like(Pn)
    for i in range(4):
        for c in range(3):
            detached[i, c] = -2 * wn[i] * Pn[i, c] / S[c]
            # d/dP_ic of -sum_j w_j P_jc^2 / S_c when S_c = sum_j P_jc also carries gradient
            through_s[i, c] = detached[i, c] + sum(wn[j] * Pn[j, c] ** 2 for j in range(4)) / S[c] ** 2
    close(grad.float(), detached.astype(np.float32))
    assert not np.allclose(grad.numpy(), through_s, rtol=1e-3, atol=1e-4)

    # The same quantity with S not detached (written out here) does give the through-S gradient: the check bites.
    Pl = P.detach().clone().requires_grad_()
    undetached = (w * (1 - (Pl**2 / Pl.sum(0)).sum(1))).sum()
    (grad_undetached,) = torch.autograd.grad(undetached, Pl)
    close(grad_undetached.numpy(), through_s)


def test_gini_errors():
    with pytest.raises(ValueError, match="gini mode"):
        gini_impurity(torch.full((2, 2), 0.5), mode="sum")
    with pytest.raises(ValueError, match=r"\(batch, classes\)"):
        gini_impurity(torch.zeros(0, 3))
    with pytest.raises(ValueError, match="weights must have shape"):
        gini_impurity(torch.full((2, 2), 0.5), torch.ones(3))


# ----------------------------------------------------------------------------------------------------------------
# alpha
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"kl_direction": "student_teacher"},
        {"alpha_mode": "entropy"},
        {"alpha_mode": "fixed", "fixed_alpha": 0.3},
    ],
)
def test_alpha_matches_hand_computation(overrides):
    cfg = CMKDConfig(**overrides)
    torch.manual_seed(2)
    zl, gl = torch.randn(5, 4) * 2, torch.randn(5, 4) * 2
    p = torch.softmax(zl, 1).requires_grad_()
    q = torch.softmax(gl, 1).requires_grad_()
    alpha = cmkd_alpha(p, q, cfg)
    expected = ref_alpha(ref_softmax(zl.numpy()), ref_softmax(gl.numpy()), cfg.alpha_mode, cfg.kl_direction, 0.3)
    close(alpha, expected)
    assert alpha.shape == (5,) and not alpha.requires_grad and alpha.grad_fn is None
    assert bool(((alpha > 0) & (alpha <= 1)).all())


def test_alpha_is_one_when_student_equals_teacher_and_directions_differ():
    torch.manual_seed(3)
    p = torch.softmax(torch.randn(3, 6), 1)
    close(cmkd_alpha(p, p.clone(), CMKDConfig()), np.ones(3))
    q = torch.softmax(torch.randn(3, 6) * 3, 1)
    a_ts = cmkd_alpha(p, q, CMKDConfig())
    a_st = cmkd_alpha(p, q, CMKDConfig(kl_direction="student_teacher"))
    assert not torch.allclose(a_ts, a_st, atol=1e-3)


def test_alpha_in_loss_has_no_grad_and_matches_reference():
    zs, gs, y, zt, gt = make_batch(4)
    zt.requires_grad_()
    out = CMKDLoss(CMKDConfig())(zs, gs, y, zt, gt, step=10)
    assert not out.alpha.requires_grad
    close(out.alpha, ref_alpha(ref_softmax(zt.detach().numpy()), ref_softmax(gt.numpy())))


# ----------------------------------------------------------------------------------------------------------------
# warm-up
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1.0, 10.0])
def test_warmup_lambda_values(gamma):
    assert warmup_lambda(0, gamma, 1000) == 0.0
    close(warmup_lambda(500, gamma, 1000), (1 - math.exp(-gamma / 2)) / (1 + math.exp(-gamma / 2)))
    at_max = (1 - math.exp(-gamma)) / (1 + math.exp(-gamma))  # tanh(gamma / 2)
    close(warmup_lambda(1000, gamma, 1000), at_max)
    assert warmup_lambda(5000, gamma, 1000) == warmup_lambda(1000, gamma, 1000)
    assert 0 < warmup_lambda(1, gamma, 1000) < warmup_lambda(2, gamma, 1000)


def test_warmup_lambda_release_saturation():
    close(warmup_lambda(10**6, 1.0, 10000), math.tanh(0.5))  # ~0.4621, the release never reaches 1


def test_warmup_lambda_errors():
    with pytest.raises(ValueError, match="step must be >= 0"):
        warmup_lambda(-1, 1.0, 10)
    with pytest.raises(TypeError, match="step must be an int"):
        warmup_lambda(1.5, 1.0, 10)
    with pytest.raises(ValueError, match="max_iter"):
        warmup_lambda(1, 1.0, 0)


# ----------------------------------------------------------------------------------------------------------------
# full loss
# ----------------------------------------------------------------------------------------------------------------
LOSS_VARIANTS = [
    {},
    {"gini": "mean"},
    {"kl_direction": "student_teacher"},
    {"alpha_mode": "fixed", "fixed_alpha": 0.5},
    {"alpha_mode": "entropy"},
    {"distill_loss": "kl"},
    {"distill_loss": "kl", "gini": "mean"},
    {"gamma": 10.0, "warmup_max_iter": 100, "label_smoothing": 0.0},
    {"lambda1": 0.025, "lambda3": 0.0025},
    {"cls_weight": 0.5, "transfer_weight": 0.1},
]


@pytest.mark.parametrize(
    "overrides", LOSS_VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default"
)
@pytest.mark.parametrize("step", [0, 37, 20000])
def test_full_loss_matches_hand_computation(overrides, step):
    cfg = CMKDConfig(**overrides)
    zs, gs, y, zt, gt = make_batch(5)
    out = CMKDLoss(cfg)(zs, gs, y, zt, gt, step)
    loss, terms, alpha, lam = ref_total(zs.numpy(), gs.numpy(), y.numpy(), zt.numpy(), gt.numpy(), step, cfg)
    close(out.loss.detach(), loss)
    for name, value in terms.items():
        close(out.terms[name], value, atol=1e-6)
    close(out.alpha, alpha)
    close(out.lam, lam, rtol=1e-12, atol=0)
    if step == 0:
        assert out.terms["task"] == 0 and out.terms["distill"] == 0 and out.terms["reg_teacher_gini"] == 0


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("distill", ["gini", "kl"])
def test_full_loss_active_classes(renormalize, distill):
    cfg = CMKDConfig.for_benchmark("office_home_partial", partial_renormalize=renormalize, distill_loss=distill)
    zs, gs, y, zt, gt = make_batch(6, c=6)
    active = [4, 0, 2]
    out = CMKDLoss(cfg)(zs, gs, y, zt, gt, 500, active_classes=torch.tensor(active))
    loss, terms, _, _ = ref_total(zs.numpy(), gs.numpy(), y.numpy(), zt.numpy(), gt.numpy(), 500, cfg, active)
    close(out.loss.detach(), loss)
    for name, value in terms.items():
        close(out.terms[name], value, atol=1e-6)
    assert bool(((out.alpha >= 0) & (out.alpha <= 1)).all())
    # Inactive target columns get no gradient when the softmax is restricted to the active ones.
    zt2 = zt.clone().requires_grad_()
    CMKDLoss(cfg)(zs, gs, y, zt2, gt, 500, active_classes=torch.tensor(active)).loss.backward()
    inactive_grad = zt2.grad[:, [1, 3, 5]].abs().max()
    assert (inactive_grad == 0) if renormalize else (inactive_grad > 0)


def test_terms_sum_to_loss_and_are_detached():
    zs, gs, y, zt, gt = make_batch(7)
    zs.requires_grad_()
    zt.requires_grad_()
    out = CMKDLoss()(zs, gs, y, zt, gt, 3000)
    t = out.terms
    assert set(t) == {"source_ce", "task", "distill", "reg_source_ce", "reg_teacher_gini", "cmkd"}
    assert all(v.dim() == 0 and not v.requires_grad for v in t.values())
    parts = t["task"] + t["distill"] + t["reg_source_ce"] + t["reg_teacher_gini"]
    torch.testing.assert_close(t["cmkd"], parts)
    torch.testing.assert_close(out.loss.detach(), t["source_ce"] + parts)
    out.loss.backward()
    assert zs.grad is not None and zt.grad is not None


def test_teacher_gets_gradient_only_from_its_own_terms():
    """mix = 0.5 * (p + sg(q)): with lambda2 = lambda3 = 0 the teacher logits receive no gradient."""
    zs, gs, y, zt, gt = make_batch(8)
    gt.requires_grad_()
    CMKDLoss(CMKDConfig(lambda2=0.0, lambda3=0.0))(zs, gs, y, zt, gt, 5000).loss.backward()
    assert gt.grad is None or gt.grad.abs().max() == 0
    gt.grad = None
    CMKDLoss(CMKDConfig(lambda2=0.0))(zs, gs, y, zt, gt, 5000).loss.backward()
    assert gt.grad.abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    zs, gs, y, zt, gt = (t.to(dtype) if t.is_floating_point() else t for t in make_batch(9, scale=8.0))
    out = CMKDLoss()(zs, gs, y, zt, gt, 9000)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    up = [t.float().numpy() if t.is_floating_point() else t.numpy() for t in (zs, gs, y, zt, gt)]
    close(out.loss, ref_total(*up, 9000, CMKDConfig())[0])


def test_extreme_logits_stay_finite():
    zs, gs, y, zt, gt = make_batch(10)
    zt = zt * 1e4  # saturated softmax: probabilities exactly 0 in float32
    gt = gt * 1e4
    zt.requires_grad_()
    out = CMKDLoss()(zs, gs, y, zt, gt, 100)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(zt.grad).all() and torch.isfinite(out.alpha).all()


# ----------------------------------------------------------------------------------------------------------------
# Appendix N, Eq. 20: the gradient of alpha * L_task + (1 - alpha) * L_distill
# ----------------------------------------------------------------------------------------------------------------
def _jacobian_setup(seed=11, B=3, C=4, D=5):
    """theta = W (C, D); p_i = softmax(W x_i). Returns W, x, q and dp/dW (B, C, C, D) via autograd."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(C, D, generator=g, dtype=torch.float64)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(B, C, generator=g, dtype=torch.float64) * 2, 1)
    dp_dW = torch.autograd.functional.jacobian(lambda w: torch.softmax(x @ w.T, 1), W)
    return W, x, q, dp_dW


def _contract(coef, dp_dW):
    """-sum_i sum_c coef[i, c] * dp_ic / dW."""
    return -torch.einsum("ic,icjd->jd", coef, dp_dW)


def test_eq20_gradient_identity_mean_gini():
    """Per sample (Eq. 4/7 Gini, alpha detached) the exact gradient is
    -sum_i [(1/2 + 3/2 alpha) p_i + 1/2 (1 - alpha) q_i] dp_i/dtheta, averaged over the batch. The student's
    coefficient always exceeds the teacher's, which is the conclusion App. N draws from Eq. 20."""
    W, x, q, dp_dW = _jacobian_setup()
    Wl = W.clone().requires_grad_()
    p = torch.softmax(x @ Wl.T, 1)
    alpha = torch.tensor([0.1, 0.6, 0.95], dtype=torch.float64)
    L = gini_impurity(p, alpha, "mean") + gini_impurity(0.5 * (p + q), 1 - alpha, "mean")
    (grad,) = torch.autograd.grad(L, Wl)

    pd, a = p.detach(), alpha[:, None]
    coef = ((0.5 + 1.5 * a) * pd + 0.5 * (1 - a) * q) / len(alpha)
    torch.testing.assert_close(grad, _contract(coef, dp_dW))


def test_eq20_as_printed_counts_the_mix_derivative_twice():
    """Eq. 20 as printed, -sum_i [(1 + alpha) p_i + (1 - alpha) q_i] dp_i/dtheta, inherits Eq. 9, which drops the
    0.5 of d(mix)/dp: it is the gradient of alpha GI(p) + 2 (1 - alpha) GI(mix), not of Eq. 10."""
    W, x, q, dp_dW = _jacobian_setup(seed=12, B=1)
    Wl = W.clone().requires_grad_()
    p = torch.softmax(x @ Wl.T, 1)
    alpha = torch.tensor([0.4], dtype=torch.float64)
    printed = _contract((1 + alpha[:, None]) * p.detach() + (1 - alpha[:, None]) * q, dp_dW)
    doubled = gini_impurity(p, alpha, "mean") + 2 * gini_impurity(0.5 * (p + q), 1 - alpha, "mean")
    torch.testing.assert_close(torch.autograd.grad(doubled, Wl)[0], printed)
    p = torch.softmax(x @ Wl.T, 1)
    eq10 = gini_impurity(p, alpha, "mean") + gini_impurity(0.5 * (p + q), 1 - alpha, "mean")
    assert not torch.allclose(torch.autograd.grad(eq10, Wl)[0], printed)


def test_eq20_gradient_identity_release_loss():
    """Through `CMKDLoss` with the release's class-balanced Gini: S^p, S^mix are detached, so the coefficient of
    dp_ic/dtheta is lambda1 * lam * [2 alpha_i p_ic / S^p_c + (1 - alpha_i) mix_ic / S^mix_c]."""
    W, x, q, dp_dW = _jacobian_setup(seed=13, B=4, C=3)
    cfg = CMKDConfig(lambda2=0.0, lambda3=0.0)
    Wl = W.clone().requires_grad_()
    zt = x @ Wl.T
    gt = q.log()  # teacher logits whose softmax is q
    zs, gs, y = torch.zeros(2, 3), torch.zeros(2, 3), torch.tensor([0, 1])
    out = CMKDLoss(cfg)(zs, gs, y, zt, gt, step=2500)
    (grad,) = torch.autograd.grad(out.loss, Wl)

    p = torch.softmax(x @ W.T, 1)
    a = out.alpha.double()[:, None]
    mix = 0.5 * (p + q)
    coef = cfg.lambda1 * out.lam * (2 * a * p / p.sum(0) + (1 - a) * mix / mix.sum(0))
    # The loss runs in float32, so compare at float32 precision.
    torch.testing.assert_close(grad.float(), _contract(coef, dp_dW).float(), rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------------------------------------------
# FixMatch
# ----------------------------------------------------------------------------------------------------------------
def test_fixmatch_loss_masking_matches_hand_computation():
    weak = torch.tensor([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 0.0, 6.0], [1.0, 3.0, 0.0]], requires_grad=True)
    torch.manual_seed(14)
    strong = torch.randn(4, 3, requires_grad=True)
    loss, frac = fixmatch_loss(weak, strong, threshold=0.8, factor=0.5)

    pw = ref_softmax(weak.detach().numpy())
    logps = np.log(ref_softmax(strong.detach().numpy()))
    total = 0.0
    kept = 0
    for i in range(4):
        if pw[i].max() >= 0.8:
            total += -logps[i, int(pw[i].argmax())]
            kept += 1
    close(loss.detach(), 0.5 * total / 4)
    close(frac, kept / 4)
    assert kept == 3  # rows 0, 2, 3 are confident (0.96, 0.995, 0.84), row 1 is not
    loss.backward()
    assert weak.grad is None
    assert strong.grad[1].abs().max() == 0 and strong.grad[0].abs().max() > 0


def test_fixmatch_threshold_edges():
    weak = torch.tensor([[200.0, 0.0], [0.0, 0.0]])  # probabilities exactly 1.0 and 0.5 in float32
    strong = torch.zeros(2, 2)
    loss, frac = fixmatch_loss(weak, strong, threshold=1.0, factor=1.0)
    close(frac, 0.5)
    close(loss, math.log(2) / 2)
    loss, frac = fixmatch_loss(weak, strong, threshold=0.0, factor=2.0)
    close(frac, 1.0)
    close(loss, 2 * math.log(2))
    with pytest.raises(ValueError, match="threshold"):
        fixmatch_loss(weak, strong, threshold=1.5, factor=1.0)
    with pytest.raises(ValueError, match="same shape"):
        fixmatch_loss(weak, torch.zeros(3, 2), threshold=0.5, factor=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------
def _call(**changes):
    zs, gs, y, zt, gt = make_batch(15)
    args = {"zs": zs, "gs": gs, "y": y, "zt": zt, "gt": gt, "step": 1, **changes}
    active = args.pop("active", None)
    return CMKDLoss()(args["zs"], args["gs"], args["y"], args["zt"], args["gt"], args["step"], active_classes=active)


@pytest.mark.parametrize(
    "changes, error, match",
    [
        ({"gs": torch.zeros(3, 4)}, ValueError, "same shape"),
        ({"zt": torch.zeros(4, 6), "gt": torch.zeros(4, 6)}, ValueError, "same class list"),
        ({"zt": torch.zeros(0, 5), "gt": torch.zeros(0, 5)}, ValueError, "both > 0"),
        ({"zs": torch.zeros(3), "gs": torch.zeros(3)}, ValueError, r"\(batch, classes\)"),
        ({"y": torch.tensor([0, 1, 5])}, ValueError, r"source_labels must be in \[0, 4\]"),
        ({"y": torch.tensor([0, -1, 2])}, ValueError, "source_labels must be in"),
        ({"y": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "integer tensor"),
        ({"y": torch.tensor([0, 1])}, ValueError, "length 3"),
        (
            {"zs": torch.zeros(3, 5, dtype=torch.long), "gs": torch.zeros(3, 5, dtype=torch.long)},
            TypeError,
            "floating",
        ),
        ({"step": -2}, ValueError, "step must be >= 0"),
        ({"active": torch.tensor([0, 7])}, ValueError, "active_classes must be in"),
        ({"active": torch.tensor([1, 1])}, ValueError, "must not repeat"),
        ({"active": torch.tensor([True, False, True, False, True])}, TypeError, "nonzero"),
        ({"active": torch.tensor([], dtype=torch.long)}, ValueError, "non-empty"),
    ],
)
def test_bad_inputs_raise_clear_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_source_and_target_batch_sizes_may_differ():
    zs, gs, y, zt, gt = make_batch(16, bs=2, bt=7)
    assert torch.isfinite(CMKDLoss()(zs, gs, y, zt, gt, 1).loss)


# ----------------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------------
def test_config_defaults_follow_release():
    cfg = CMKDConfig()
    assert (cfg.lambda1, cfg.lambda2, cfg.lambda3, cfg.label_smoothing) == (0.25, 0.1, 0.025, 0.1)
    assert (cfg.gamma, cfg.warmup_max_iter) == (1.0, 10000)
    assert (cfg.gini, cfg.alpha_mode, cfg.kl_direction, cfg.distill_loss) == (
        "balanced_sum",
        "kl",
        "teacher_student",
        "gini",
    )
    assert (cfg.fixmatch_threshold, cfg.fixmatch_factor) == (0.95, 0.5)
    lit = CMKDConfig.paper_literal()
    assert (lit.gini, lit.kl_direction) == ("mean", "student_teacher")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("domainnet", {"lambda1": 0.025, "lambda3": 0.0025, "fixmatch_threshold": 0.95, "fixmatch_factor": 0.1}),
        ("visda", {"lambda1": 0.25, "lambda3": 0.025, "fixmatch_threshold": 0.80, "fixmatch_factor": 2.0}),
        ("Office-Home", {"lambda1": 0.25, "lambda2": 0.1, "fixmatch_threshold": 0.95, "fixmatch_factor": 0.5}),
        ("office_home_partial", {"cls_weight": 0.5, "transfer_weight": 0.1, "partial_class_threshold": 14}),
        ("digits", {"lambda3": 0.025, "cls_weight": 1.0}),
    ],
)
def test_for_benchmark_values(name, expected):
    cfg = CMKDConfig.for_benchmark(name)
    for key, value in expected.items():
        assert getattr(cfg, key) == value, key


def test_for_benchmark_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid names:.*domainnet.*visda"):
        CMKDConfig.for_benchmark("imagenet")
    assert CMKDConfig.for_benchmark("visda", fixmatch_factor=1.0).fixmatch_factor == 1.0


def test_config_dict_round_trip():
    cfg = CMKDConfig.for_benchmark("domainnet", alpha_mode="entropy")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert CMKDConfig.from_dict(data) == cfg
    with pytest.raises(ValueError, match="Unknown CMKDConfig field.*lamda1.*valid fields"):
        CMKDConfig.from_dict({"lamda1": 0.1})


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lambda1": -0.1}, ValueError, "lambda1 must be in"),
        ({"lambda2": float("nan")}, ValueError, "finite"),
        ({"lambda3": "0.1"}, TypeError, "number"),
        ({"label_smoothing": 1.0}, ValueError, "label_smoothing"),
        ({"gamma": 0.0}, ValueError, "gamma"),
        ({"warmup_max_iter": 0}, ValueError, "warmup_max_iter"),
        ({"warmup_max_iter": 10.0}, TypeError, "int"),
        ({"warmup_max_iter": True}, TypeError, "int"),
        ({"gini": "sum"}, ValueError, r"gini must be one of \['balanced_sum', 'mean'\]"),
        ({"alpha_mode": "gibbs"}, ValueError, "alpha_mode"),
        ({"kl_direction": "forward"}, ValueError, "kl_direction"),
        ({"distill_loss": "ce"}, ValueError, "distill_loss"),
        ({"fixed_alpha": 1.5}, ValueError, "fixed_alpha"),
        ({"fixmatch_threshold": -0.1}, ValueError, "fixmatch_threshold"),
        ({"fixmatch_factor": -1.0}, ValueError, "fixmatch_factor"),
        ({"transfer_weight": -1.0}, ValueError, "transfer_weight"),
        ({"partial_class_threshold": -1}, ValueError, "partial_class_threshold"),
        ({"partial_renormalize": 1}, TypeError, "bool"),
    ],
)
def test_config_validation(kwargs, error, match):
    with pytest.raises(error, match=match):
        CMKDConfig(**kwargs)


def test_loss_rejects_non_config():
    with pytest.raises(TypeError, match="CMKDConfig"):
        CMKDLoss({"lambda1": 0.1})
