"""RST matches Algorithm 1 bit for bit in every training loop, with nothing for the user to call.

The reference in each test is written here, independently of peft_rst: full fine-tuning of a deep copy of the model
plus `w = where(|w - w0| <= tau, w0, w)` after each optimizer step (`rst_tools.ManualRST`).
"""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_rst import RSTConfig

OPTIMIZERS = {
    "sgd": (lambda params: torch.optim.SGD(params, lr=0.05), 1e-3),
    # the release's optimizer
    "sgd_nesterov_wd": (
        lambda params: torch.optim.SGD(params, lr=0.02, momentum=0.9, nesterov=True, weight_decay=5e-4),
        1e-3,
    ),
    # eps comparable to the gradients, so that step sizes vary and tau splits the entries
    "adamw": (lambda params: torch.optim.AdamW(params, lr=1e-2, eps=1e-2, weight_decay=1e-2), 3e-3),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_plain_loop_matches_manual_algorithm_1(rst_tools, opt_name):
    make_optimizer, tau = OPTIMIZERS[opt_name]
    base = rst_tools.MLP()
    reference = rst_tools.twin(base)
    pretrained = rst_tools.snapshot(dict(base.named_parameters()))
    model = get_peft_model(base, RSTConfig(tau=tau))  # w0 is recorded here
    manual = rst_tools.ManualRST(reference, tau)
    opt = make_optimizer(rst_tools.trainable(model))
    ref_opt = make_optimizer(list(reference.parameters()))
    data = rst_tools.batches(6, rst_tools.mlp_batch)

    for step, batch in enumerate(data, start=1):
        rst_tools.run_steps(model, opt, [batch])  # no RST call anywhere
        rst_tools.run_steps(reference, ref_opt, [batch], after_step=manual.reset)
        rst_tools.assert_reset_invariant(model, tau)
        assert model.base_model.reset_step() == step
        changed = rst_tools.assert_matches_reference(model, reference)

    total = sum(p.numel() for p in reference.parameters())
    assert 0 < changed < total, "tau should reset some entries and keep others, or the test proves nothing"
    # w0 is the weights at wrap time, and training never touched it
    for name, w0 in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w0, pretrained[name]), name


def test_trainer_matches_manual_algorithm_1(rst_tools, tmp_path):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = rst_tools.MLP()

        def forward(self, x, labels=None):
            logits = self.net(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    tau = 3e-3
    g = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(6, generator=g), "labels": i % 3} for i in range(32)]

    def args():
        return TrainingArguments(
            output_dir=str(tmp_path),
            use_cpu=True,
            report_to="none",
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            per_device_train_batch_size=8,
            num_train_epochs=2,
            learning_rate=1e-2,
            adam_epsilon=1e-2,  # comparable to the gradients: step sizes vary, so tau splits the entries
            seed=0,
            remove_unused_columns=False,
        )

    class ManualReset(TrainerCallback):
        """The reference: Algorithm 1's reset right after each optimizer step of the plain model."""

        def __init__(self, manual):
            self.manual = manual

        def on_step_end(self, args, state, control, **kwargs):
            self.manual.reset()

    class CheckInvariant(TrainerCallback):
        def __init__(self):
            self.checked = 0

        def on_step_end(self, args, state, control, model=None, **kwargs):
            rst_tools.assert_reset_invariant(rst_model, tau)
            assert rst_model.base_model.reset_step() == state.global_step
            self.checked += 1

    base = Classifier()
    reference = rst_tools.twin(base)
    rst_model = get_peft_model(base, RSTConfig(tau=tau))
    check = CheckInvariant()
    Trainer(model=rst_model, args=args(), train_dataset=data, callbacks=[check]).train()
    Trainer(
        model=reference, args=args(), train_dataset=data, callbacks=[ManualReset(rst_tools.ManualRST(reference, tau))]
    ).train()

    assert check.checked == 8
    changed = rst_tools.assert_matches_reference(rst_model, reference)
    assert 0 < changed < sum(p.numel() for p in reference.parameters())


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_accelerate_gradient_accumulation_one_reset_per_step(rst_tools, fresh_accelerate_state):
    """One optimizer step = one reset, whatever the number of micro-batches."""
    from accelerate import Accelerator

    tau, accumulation = 1e-3, 3
    base = rst_tools.MLP()
    reference = rst_tools.twin(base)
    model = get_peft_model(base, RSTConfig(tau=tau))
    manual = rst_tools.ManualRST(reference, tau)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05, momentum=0.9)
    model, opt = accelerator.prepare(model, opt)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    data = rst_tools.batches(4 * accumulation, rst_tools.mlp_batch)

    for i, (x, y) in enumerate(data):
        with accelerator.accumulate(model):
            accelerator.backward(nn.functional.cross_entropy(model(x), y))
            opt.step()
            opt.zero_grad()
        # the reference: the same accumulation by hand (accelerate divides the loss by the number of micro-batches)
        (nn.functional.cross_entropy(reference(x), y) / accumulation).backward()
        if (i + 1) % accumulation == 0:
            ref_opt.step()
            ref_opt.zero_grad()
            manual.reset()
        assert model.base_model.reset_step() == (i + 1) // accumulation
    rst_tools.assert_reset_invariant(model, tau)
    changed = rst_tools.assert_matches_reference(model, reference)
    assert 0 < changed < sum(p.numel() for p in reference.parameters())


def _put_within_tau(rst_tools, model, tau):
    """Move one entry of each W to w0 + tau/2: the next reset of this adapter must put it back to w0."""
    bases = rst_tools.base_weights(model)
    with torch.no_grad():
        for name, w in rst_tools.adapter_weights(model).items():
            w.view(-1)[0] = bases[name].view(-1)[0] + tau / 2
    return rst_tools.snapshot(rst_tools.adapter_weights(model))


def test_micro_batch_without_step_resets_nothing(rst_tools, fresh_accelerate_state):
    from accelerate import Accelerator

    tau = 1e-2
    model = get_peft_model(rst_tools.MLP(), RSTConfig(tau=tau))
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    # lr=0: the step itself changes nothing, so any difference is the reset's doing
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.0)
    model, opt = accelerator.prepare(model, opt)
    before = _put_within_tau(rst_tools, model, tau)
    (x1, y1), (x2, y2) = rst_tools.batches(2, rst_tools.mlp_batch)

    with accelerator.accumulate(model):
        accelerator.backward(nn.functional.cross_entropy(model(x1), y1))
        opt.step()
        opt.zero_grad()
    assert not accelerator.sync_gradients
    assert model.base_model.reset_step() == 0
    for name, w in rst_tools.adapter_weights(model).items():
        assert rst_tools.bitwise_equal(w, before[name]), f"{name} was reset on a micro-batch without a step"

    with accelerator.accumulate(model):
        accelerator.backward(nn.functional.cross_entropy(model(x2), y2))
        opt.step()
        opt.zero_grad()
    assert model.base_model.reset_step() == 1
    bases = rst_tools.base_weights(model)
    for name, w in rst_tools.adapter_weights(model).items():
        assert rst_tools.bitwise_equal(w, bases[name]), f"{name} was not reset by the optimizer step"


def test_other_optimizers_do_not_reset(rst_tools):
    """Only an optimizer holding an adapter's parameters triggers that adapter's reset."""
    tau = 1e-2
    model_a = get_peft_model(rst_tools.MLP(), RSTConfig(tau=tau))
    model_b = get_peft_model(rst_tools.MLP(), RSTConfig(tau=tau))
    plain = nn.Linear(4, 2)
    before_a = _put_within_tau(rst_tools, model_a, tau)
    before_b = _put_within_tau(rst_tools, model_b, tau)

    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    plain(torch.randn(3, 4)).sum().backward()
    plain_opt.step()
    opt_b = torch.optim.SGD(rst_tools.trainable(model_b), lr=0.0)
    opt_b.step()

    assert model_a.base_model.reset_step() == 0
    for name, w in rst_tools.adapter_weights(model_a).items():
        assert rst_tools.bitwise_equal(w, before_a[name]), name
    assert model_b.base_model.reset_step() == 1
    bases_b = rst_tools.base_weights(model_b)
    for name, w in rst_tools.adapter_weights(model_b).items():
        assert rst_tools.bitwise_equal(w, bases_b[name]), name
        assert not rst_tools.bitwise_equal(w, before_b[name]), name


def test_skipped_amp_step_does_not_reset(rst_tools):
    """GradScaler skips the optimizer step when gradients overflow; no step means no reset."""
    tau = 1e-2
    model = get_peft_model(rst_tools.MLP(), RSTConfig(tau=tau))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.0)
    scaler = torch.amp.GradScaler("cpu")
    before = _put_within_tau(rst_tools, model, tau)
    x, y = rst_tools.batches(1, rst_tools.mlp_batch)[0]

    scaler.scale(nn.functional.cross_entropy(model(x), y) * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert model.base_model.reset_step() == 0
    for name, w in rst_tools.adapter_weights(model).items():
        assert rst_tools.bitwise_equal(w, before[name]), name

    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert model.base_model.reset_step() == 1
    rst_tools.assert_reset_invariant(model, tau)


def test_modules_to_save_are_trained_densely_not_reset(rst_tools):
    """The task head is outside RST: its entries stay wherever training put them, even within tau."""
    tau = 10.0  # resets every RST entry, so only the head can move
    base = rst_tools.MLP()
    head_before = rst_tools.snapshot(dict(base.head.named_parameters()))
    body = {n for n, _ in base.named_parameters() if not n.startswith("head.")}
    model = get_peft_model(base, RSTConfig(tau=tau, modules_to_save=["head"]))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=1e-3)
    rst_tools.run_steps(model, opt, rst_tools.batches(2, rst_tools.mlp_batch))

    assert set(rst_tools.adapter_weights(model)) == body
    bases = rst_tools.base_weights(model)
    for name, w in rst_tools.adapter_weights(model).items():
        assert rst_tools.bitwise_equal(w, bases[name]), name
    head = rst_tools.saved_module_weights(model)
    for name in ("weight", "bias"):
        moved = (head[f"head.{name}"] - head_before[name]).abs()
        assert (moved > 0).all() and (moved < tau).all()
