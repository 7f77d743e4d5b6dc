"""CMKDTrainer: optimisation against a hand-written loop, modes, logging, checkpoints, RST, multi-process, learning."""

import copy
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from tiny_clip_models import CharTokenizer, tiny_clip
from transformers import CLIPModel, TrainerCallback

from cmkd import (
    CLIPAdaptationModel,
    CMKDConfig,
    CMKDLoss,
    CMKDTrainer,
    CMKDTrainingArguments,
    fixmatch_loss,
    image_transform,
    make_paired_dataloader,
    with_image_transform,
)
from cmkd.validators import DEFAULT_VALIDATOR

NAMES = ["cat", "dog", "bird"]
REPO = Path(__file__).resolve().parents[2]


def raw_dataset(n: int, seed: int, names=NAMES) -> Dataset:
    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": Image(), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"image": images, "label": [i % len(names) for i in range(n)]}, features=features)


def labeled(n: int, seed: int, **kwargs):
    return with_image_transform(raw_dataset(n, seed), image_transform(32, train=False), **kwargs)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def data():
    return {"source": labeled(24, 0), "target": labeled(24, 1)}


def fresh_model(clip):
    torch.manual_seed(1)
    return CLIPAdaptationModel.from_clip(clip, NAMES, "a photo of a {}.", tokenizer=CharTokenizer())


def make_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        head_lr_multiplier=10.0,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=7,
    )
    settings.update(overrides)
    return CMKDTrainingArguments(**settings)


def head_and_backbone(model):
    head_ids = {id(p) for p in model.head.parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids]
    backbone = [p for p in model.parameters() if id(p) not in head_ids]
    return backbone, head


def reference_training(model, source, target, steps, lr, mult, seed, cfg, bs=4):
    """The release's loop written out by hand: two forward passes per step, SGD, inverse-decay LambdaLR."""
    backbone, head = head_and_backbone(model)
    opt = torch.optim.SGD(
        [{"params": backbone, "lr": lr}, {"params": head, "lr": lr * mult}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 + 0.0003 * t) ** -0.75)
    loss_fn = CMKDLoss(cfg)
    batches = iter(make_paired_dataloader(source, target, source_batch_size=bs, target_batch_size=bs, seed=seed))
    losses = []
    for step in range(steps):
        batch = next(batches)
        model.train()
        src = model(pixel_values=batch["source_pixel_values"])
        tgt = model(pixel_values=batch["target_pixel_values"])
        out = loss_fn(src.logits, src.teacher_logits, batch["source_labels"], tgt.logits, tgt.teacher_logits, step)
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses


# ----------------------------------------------------------------------------------------------- optimisation
def test_cmkd_training_matches_hand_written_release_loop(clip, data, tmp_path):
    cfg = CMKDConfig(warmup_max_iter=10)  # a visible warm-up within 3 steps
    reference = fresh_model(clip)
    trained = copy.deepcopy(reference)
    ref_losses = reference_training(reference, data["source"], data["target"], 3, 1e-3, 10.0, 7, cfg)

    trainer = CMKDTrainer(
        trained, make_args(tmp_path), source_dataset=data["source"], target_dataset=data["target"], cmkd_config=cfg
    )
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    np.testing.assert_allclose(logged, ref_losses, rtol=1e-5)
    for (name, p), (_, q) in zip(trained.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p, q, atol=2e-6, rtol=1e-5, msg=name)
    torch.testing.assert_close(trained.head.batch_norm.running_mean, reference.head.batch_norm.running_mean)


def test_optimizer_groups_and_inverse_decay_schedule(clip, data, tmp_path):
    model = fresh_model(clip)
    args = make_args(tmp_path, learning_rate=3e-6, head_lr_multiplier=1000.0)
    trainer = CMKDTrainer(model, args, source_dataset=data["source"], target_dataset=data["target"])
    opt = trainer.create_optimizer()
    assert isinstance(opt, torch.optim.SGD)
    backbone, head = head_and_backbone(model)
    assert [len(g["params"]) for g in opt.param_groups] == [len(backbone), len(head)]
    assert {id(p) for p in opt.param_groups[1]["params"]} == {id(p) for p in head}
    for group, lr in zip(opt.param_groups, (3e-6, 3e-3)):
        assert group["lr"] == pytest.approx(lr)
        assert group["momentum"] == 0.9 and group["nesterov"] and group["weight_decay"] == 5e-4
    sched = trainer.create_scheduler(num_training_steps=100)
    for _ in range(40):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(3e-6 * (1 + 0.0003 * 40) ** -0.75)
    assert opt.param_groups[1]["lr"] == pytest.approx(3e-3 * (1 + 0.0003 * 40) ** -0.75)


def test_gradient_accumulation_draws_one_pair_per_micro_batch(clip, data, tmp_path):
    trainer = CMKDTrainer(
        fresh_model(clip),
        make_args(tmp_path, max_steps=2, gradient_accumulation_steps=2),
        source_dataset=data["source"],
        target_dataset=data["target"],
    )
    calls = []
    original = trainer.compute_loss

    def spy(model, inputs, *args, **kwargs):
        calls.append(inputs["source_pixel_values"].shape[0])
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = spy
    trainer.train()
    assert calls == [4, 4, 4, 4] and trainer.state.global_step == 2


def test_bf16_autocast_through_the_trainer(clip, data, tmp_path):
    """bf16=True runs the forward under Accelerate's autocast (outputs come back as fp32 for the loss)."""
    losses = {}
    for bf16 in (False, True):
        trainer = CMKDTrainer(
            fresh_model(clip), make_args(tmp_path, max_steps=1, bf16=bf16), data["source"], data["target"]
        )
        trainer.train()
        losses[bf16] = trainer.state.log_history[0]["loss"]
    assert losses[True] != losses[False]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)


# ----------------------------------------------------------------------------------------------- modes
def batch_inputs(seed: int, bs: int = 4, strong: bool = False):
    g = torch.Generator().manual_seed(seed)
    inputs = {
        "source_pixel_values": torch.randn(bs, 3, 32, 32, generator=g),
        "source_labels": torch.tensor([0, 1, 2, 0][:bs]),
        "target_pixel_values": torch.randn(bs, 3, 32, 32, generator=g),
    }
    if strong:
        inputs["target_strong_pixel_values"] = torch.randn(bs, 3, 32, 32, generator=g)
    return inputs


def test_source_only_loss_is_label_smoothed_ce_and_needs_no_target(clip, data, tmp_path):
    model = fresh_model(clip)
    trainer = CMKDTrainer(model, make_args(tmp_path, mode="source_only"), source_dataset=data["source"])
    inputs = batch_inputs(0)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    expected = F.cross_entropy(
        model(pixel_values=inputs["source_pixel_values"]).logits, inputs["source_labels"], label_smoothing=0.1
    )
    torch.testing.assert_close(loss, expected)
    trainer.train()
    assert trainer.state.global_step == 3


def test_fixmatch_adds_student_and_teacher_consistency_terms(clip, data, tmp_path):
    model = fresh_model(clip)
    cfg = CMKDConfig(fixmatch_threshold=0.3, fixmatch_factor=0.5)
    strong_target = labeled(24, 1, strong_transform=image_transform(32, train=True))
    trainer = CMKDTrainer(
        model,
        make_args(tmp_path, mode="cmkd_fixmatch", max_steps=2),
        source_dataset=data["source"],
        target_dataset=strong_target,
        cmkd_config=cfg,
    )
    inputs = batch_inputs(1, strong=True)
    model.train()
    loss = trainer.compute_loss(model, inputs)
    src = model(pixel_values=inputs["source_pixel_values"])
    weak = model(pixel_values=inputs["target_pixel_values"])
    strong = model(pixel_values=inputs["target_strong_pixel_values"])
    cmkd = CMKDLoss(cfg)(src.logits, src.teacher_logits, inputs["source_labels"], weak.logits, weak.teacher_logits, 0)
    student_fm, _ = fixmatch_loss(weak.logits, strong.logits, 0.3, 0.5)
    teacher_fm, _ = fixmatch_loss(weak.teacher_logits, strong.teacher_logits, 0.3, 0.5)
    torch.testing.assert_close(loss, cmkd.loss + student_fm + teacher_fm, atol=1e-5, rtol=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all("fixmatch_student" in h and "fixmatch_teacher_mask" in h for h in logs)


def test_zero_shot_evaluation_scores_the_teacher(clip, data, tmp_path):
    model = fresh_model(clip)
    trainer = CMKDTrainer(model, make_args(tmp_path, mode="zero_shot"), eval_dataset=data["target"])
    metrics = trainer.evaluate()
    pixels = torch.stack([data["target"][i]["pixel_values"] for i in range(24)])
    labels = torch.tensor([data["target"][i]["labels"] for i in range(24)])
    with torch.no_grad():
        teacher = model.eval()(pixel_values=pixels).teacher_logits.argmax(-1)
    per_class = [(teacher[labels == c] == c).float().mean().item() for c in range(3)]
    assert metrics["eval_accuracy"] == pytest.approx((teacher == labels).float().mean().item())
    assert metrics["eval_mean_class_accuracy"] == pytest.approx(sum(per_class) / 3)
    assert metrics["eval_per_class_accuracy"] == pytest.approx(per_class)
    with pytest.raises(ValueError, match="only evaluates"):
        trainer.train()


def test_per_class_lists_stay_out_of_printed_and_tracked_logs(clip, data, tmp_path):
    """Callbacks (console printer, trackers) get scalars only; the per-class list stays in the returned metrics and
    in the log history (trainer_state.json)."""

    class Capture(TrainerCallback):
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))

    capture = Capture()
    trainer = CMKDTrainer(
        fresh_model(clip), make_args(tmp_path, mode="zero_shot"), eval_dataset=data["target"], callbacks=[capture]
    )
    metrics = trainer.evaluate()
    assert len(metrics["eval_per_class_accuracy"]) == 3
    assert capture.logs and not [k for log in capture.logs for k, v in log.items() if isinstance(v, list)]
    assert capture.logs[-1]["eval_accuracy"] == metrics["eval_accuracy"]
    assert trainer.state.log_history[-1]["eval_per_class_accuracy"] == metrics["eval_per_class_accuracy"]


def test_partial_set_estimates_label_set_before_each_later_epoch(clip, data, tmp_path):
    model = fresh_model(clip)
    cfg = CMKDConfig(partial_class_threshold=9)
    trainer = CMKDTrainer(
        model,
        make_args(tmp_path, partial_set=True, iterations_per_epoch=2, max_steps=3),
        source_dataset=data["source"],
        target_dataset=data["target"],
        cmkd_config=cfg,
    )
    pixels = torch.stack([data["target"][i]["pixel_values"] for i in range(24)])
    expected = {}

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                with torch.no_grad():
                    preds = model.eval()(pixel_values=pixels).logits.argmax(-1)
                counts = torch.bincount(preds, minlength=3)
                keep = [c for c in range(3) if counts[c] >= 9]
                expected["set"] = keep or [0, 1, 2]

    seen = []
    original = trainer.loss_fn.forward

    def spy(*args, active_classes=None, **kwargs):
        seen.append(None if active_classes is None else active_classes.tolist())
        return original(*args, active_classes=active_classes, **kwargs)

    trainer.loss_fn.forward = spy
    trainer.add_callback(Snapshot())
    trainer.train()
    assert seen[:2] == [None, None]
    assert seen[2] == expected["set"] == trainer.label_set.tolist()


# ----------------------------------------------------------------------------------------------- logs, checkpoints
def test_logs_terms_alpha_and_never_runs_the_text_tower(clip, data, tmp_path):
    model = fresh_model(clip)
    calls = []
    handle = clip.text_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        trainer = CMKDTrainer(
            model,
            make_args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1),
            source_dataset=data["source"],
            target_dataset=data["target"],
        )
        trainer.train()
        trainer.evaluate()
    finally:
        handle.remove()
    assert calls == [], "the text tower must not run during training or evaluation"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for h in logs:
        for key in ("source_ce", "task", "distill", "reg_source_ce", "reg_teacher_gini", "cmkd", "lam"):
            assert key in h
        assert 0 <= h["alpha_min"] <= h["alpha_mean"] <= h["alpha_max"] <= 1
        assert h["head_learning_rate"] == pytest.approx(10 * h["learning_rate"])
        total = h["source_ce"] + h["cmkd"]
        assert h["loss"] == pytest.approx(total, rel=1e-5)
    evals = [h for h in trainer.state.log_history if "eval_accuracy" in h]
    assert len(evals) == 3 and all("eval_teacher_accuracy" in h for h in evals)  # 2 periodic + 1 final


@pytest.mark.parametrize("metric", [None, "accuracy", "ent"])
def test_best_checkpoint_is_kept_and_reloaded(clip, data, tmp_path, metric):
    model = fresh_model(clip)
    extra = {} if metric is None else {"metric_for_best_model": metric}
    args = make_args(
        tmp_path,
        max_steps=3,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        save_total_limit=1,
        **extra,
    )
    name = metric or DEFAULT_VALIDATOR
    assert args.metric_for_best_model == name and args.greater_is_better == (name != "ent")
    trainer = CMKDTrainer(model, args, source_dataset=data["source"], target_dataset=data["target"])
    trainer.train()
    values = [h[f"eval_{name}"] for h in trainer.state.log_history if f"eval_{name}" in h]
    assert len(values) == 3
    best = trainer.state.best_model_checkpoint
    assert best is not None and (Path(best) / "model.safetensors").exists()
    assert trainer.state.best_metric == (max(values) if args.greater_is_better else min(values))
    assert trainer.evaluate()[f"eval_{name}"] == trainer.state.best_metric
    reloaded = CLIPAdaptationModel.from_pretrained(best)
    assert torch.equal(reloaded.text_features, model.text_features)


def test_unlabeled_target_trains_evaluates_and_selects_label_free(clip, data, tmp_path):
    unlabeled = with_image_transform(raw_dataset(12, 1).remove_columns("label"), image_transform(32, False))
    args = make_args(
        tmp_path, eval_strategy="steps", eval_steps=1, save_strategy="steps", save_steps=1, load_best_model_at_end=True
    )
    trainer = CMKDTrainer(
        fresh_model(clip),
        args,
        source_dataset=data["source"],
        target_dataset=unlabeled,
        source_val_dataset=labeled(8, 5),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {f"eval_{n}" for n in ("ent", "snd", "bnm", "im", "zs_agreement", "source_accuracy")} <= set(metrics)
    assert "eval_accuracy" not in metrics  # no target labels: nothing label-based is reported
    assert "eval_dev" not in metrics  # opt-in: it fits a domain classifier at every evaluation
    assert trainer.state.best_model_checkpoint is not None
    trainer.args.eval_validators = ["dev", "snd"]
    again = trainer.evaluate()
    assert {"eval_dev", "eval_snd"} <= set(again) and "eval_ent" not in again


def test_zero_shot_agreement_is_measured_against_the_model_before_training(clip, data, tmp_path):
    model = fresh_model(clip)
    target = data["target"]
    with torch.no_grad():
        pixels = torch.stack([target[i]["pixel_values"] for i in range(len(target))])
        zero_shot = model.teacher_logits(model.get_image_features(pixels)).argmax(-1)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=3, max_steps=3)
    trainer = CMKDTrainer(model, args, source_dataset=data["source"], target_dataset=target)
    trainer.train()
    with torch.no_grad():
        student = model(pixel_values=pixels).logits.argmax(-1)
    assert trainer.evaluate()["eval_zs_agreement"] == pytest.approx((student == zero_shot).double().mean().item())


# ----------------------------------------------------------------------------------------------- bad input
def test_mismatched_class_lists_are_rejected(clip, tmp_path):
    wrong = with_image_transform(raw_dataset(6, 0, names=["cat", "dog", "cow"]), image_transform(32, False))
    with pytest.raises(ValueError, match=r"source dataset class list .* missing \['bird'\]"):
        CMKDTrainer(fresh_model(clip), make_args(tmp_path), source_dataset=wrong, target_dataset=labeled(6, 1))
    with pytest.raises(ValueError, match="partial_set=True"):
        subset = with_image_transform(raw_dataset(6, 0, names=["cat", "dog"]), image_transform(32, False))
        CMKDTrainer(fresh_model(clip), make_args(tmp_path), source_dataset=labeled(6, 0), target_dataset=subset)


def test_selection_metrics_name_what_supplies_them(clip, data, tmp_path):
    unlabeled = with_image_transform(raw_dataset(6, 1).remove_columns("label"), image_transform(32, False))
    trainer = CMKDTrainer(
        fresh_model(clip), make_args(tmp_path), source_dataset=data["source"], target_dataset=unlabeled
    )
    trainer.train()  # training never needs target labels
    assert "eval_accuracy" not in trainer.evaluate()
    oracle = make_args(tmp_path, eval_strategy="steps", metric_for_best_model="accuracy")
    with pytest.raises(ValueError, match=r"oracle \(uses target labels\).*labeled eval_dataset="):
        CMKDTrainer(fresh_model(clip), oracle, source_dataset=data["source"], target_dataset=unlabeled)
    dev = make_args(tmp_path, eval_strategy="steps", metric_for_best_model="dev")
    with pytest.raises(ValueError, match="source_val_dataset="):
        CMKDTrainer(fresh_model(clip), dev, source_dataset=data["source"], target_dataset=unlabeled)
    typo = make_args(tmp_path, eval_strategy="steps", metric_for_best_model="entropy")
    with pytest.raises(ValueError, match="not computed by CMKDTrainer"):
        CMKDTrainer(fresh_model(clip), typo, source_dataset=data["source"], target_dataset=unlabeled)
    with pytest.raises(ValueError, match="eval_validators"):
        make_args(tmp_path, eval_validators=["snd", "mixval"])
    no_teacher = fresh_model(clip)
    no_teacher.config.has_text_features = False
    agreement = make_args(tmp_path, eval_strategy="steps", mode="source_only", metric_for_best_model="zs_agreement")
    with pytest.raises(ValueError, match="zero-shot CLIP teacher, which this model does not have"):
        CMKDTrainer(no_teacher, agreement, source_dataset=data["source"], target_dataset=unlabeled)
    plain = make_args(tmp_path, eval_strategy="steps", mode="source_only")  # the default validator needs no teacher
    CMKDTrainer(no_teacher, plain, source_dataset=data["source"], target_dataset=unlabeled)
    source_only = make_args(tmp_path, eval_strategy="steps", mode="source_only")
    with pytest.raises(ValueError, match="target images"):
        CMKDTrainer(fresh_model(clip), source_only, source_dataset=data["source"])


def test_wrong_batches_and_settings_are_clear_errors(clip, data, tmp_path):
    model = fresh_model(clip)
    trainer = CMKDTrainer(model, make_args(tmp_path), source_dataset=data["source"], target_dataset=data["target"])
    bad = batch_inputs(0)
    bad["source_pixel_values"] = bad["source_pixel_values"][0]
    with pytest.raises(ValueError, match="source_pixel_values must be"):
        trainer.compute_loss(model, bad)
    bad = batch_inputs(0)
    bad["source_labels"] = bad["source_labels"][:2]
    with pytest.raises(ValueError, match="source_labels must have shape"):
        trainer.compute_loss(model, bad)
    bad = batch_inputs(0)
    bad["target_pixel_values"] = torch.randn(4, 3, 24, 24)
    with pytest.raises(ValueError, match="must match the source images"):
        trainer.compute_loss(model, bad)
    with pytest.raises(ValueError, match="needs the unlabeled target set"):
        CMKDTrainer(model, make_args(tmp_path), source_dataset=data["source"])
    with pytest.raises(ValueError, match="strong view"):
        CMKDTrainer(model, make_args(tmp_path, mode="cmkd_fixmatch"), data["source"], data["target"])
    with pytest.raises(ValueError, match="mode must be one of"):
        make_args(tmp_path, mode="fixmatch")
    with pytest.raises(TypeError, match="CLIPAdaptationModel"):
        CMKDTrainer(clip, make_args(tmp_path), source_dataset=data["source"], target_dataset=data["target"])


# ----------------------------------------------------------------------------------------------- RST
def test_cmkd_with_rst_saves_sparse_adapter_and_head(clip, data, tmp_path):
    pytest.importorskip("peft_rst")
    from peft import PeftModel, get_peft_model

    from peft_rst import RSTConfig

    base_state = {k: v.clone() for k, v in fresh_model(clip).state_dict().items()}
    peft_model = get_peft_model(fresh_model(clip), RSTConfig(tau=1e-4, modules_to_save=["head"]))
    args = make_args(
        tmp_path,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
    )
    trainer = CMKDTrainer(peft_model, args, source_dataset=data["source"], target_dataset=data["target"])
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert (best / "adapter_model.safetensors").exists() and not (best / "model.safetensors").exists()
    # RST invariant after the optimizer steps: every targeted entry within tau of w0 is exactly w0
    layer = next(m for m in peft_model.modules() if hasattr(m, "rst_weight"))
    for name, weight in layer.rst_weight["default"].items():
        w0 = dict(layer.base_layer.named_parameters())[name]
        close = (weight - w0).abs() <= 1e-4
        assert torch.equal(weight[close], w0[close])
    out_dir = tmp_path / "final"
    peft_model.save_pretrained(out_dir)
    from safetensors import safe_open

    with safe_open(str(out_dir / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("head.classifier.weight") for k in keys), "the dense head is saved with the adapter"
    assert not any("text_features" in k or "logit_scale" in k for k in keys), "teacher buffers belong to the base"
    base = fresh_model(clip)
    base.load_state_dict(base_state)
    reloaded = PeftModel.from_pretrained(base, out_dir).eval()
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(pixel_values=pixels).logits, peft_model.eval()(pixel_values=pixels).logits)


# ----------------------------------------------------------------------------------------------- multi-process
DDP_SCRIPT = textwrap.dedent(
    """
    import sys, json, torch
    sys.path.insert(0, {test_dir!r})
    from test_trainer import tiny_clip, fresh_model, labeled, make_args
    from cmkd import CMKDTrainer, CMKDConfig
    out, per_device = sys.argv[1], int(sys.argv[2])
    model = fresh_model(tiny_clip())
    args = make_args(out, per_device_train_batch_size=per_device, max_steps=3, eval_strategy="steps", eval_steps=3)
    trainer = CMKDTrainer(model, args, source_dataset=labeled(24, 0), target_dataset=labeled(24, 1),
                          cmkd_config=CMKDConfig(warmup_max_iter=10))
    trainer.train()
    if trainer.is_world_process_zero():
        torch.save({{k: v.detach().clone() for k, v in model.state_dict().items()}}, out + "/state.pt")
        json.dump(trainer.state.log_history, open(out + "/log.json", "w"))
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_match_one_process(tmp_path):
    """Two CPU processes (batch 4 each, gloo) train exactly like one process with batch 8.

    `accelerate launch --cpu --num_processes N` starts N processes only through mpirun; without MPI, accelerate's
    torchrun launcher (`--multi_gpu`) with `use_cpu=True` in the arguments gives the same multi-CPU (gloo) run.
    """
    script = tmp_path / "run.py"
    script.write_text(DDP_SCRIPT.format(test_dir=str(Path(__file__).parent)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    one, two = tmp_path / "one", tmp_path / "two"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no"]
    commands = [
        [*launch, "--cpu", "--num_processes", "1", str(script), str(one), "8"],
        [*launch, "--multi_gpu", "--num_processes", "2", "--main_process_port", str(_free_port())]
        + [str(script), str(two), "4"],
    ]
    procs = [
        subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for cmd in commands
    ]
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out.decode()[-3000:]
    s1, s2 = torch.load(one / "state.pt"), torch.load(two / "state.pt")
    for key in s1:
        torch.testing.assert_close(s2[key], s1[key], atol=1e-6, rtol=1e-5, msg=key)
    l1, l2 = json.loads((one / "log.json").read_text()), json.loads((two / "log.json").read_text())
    for key in ("loss", "grad_norm", "alpha_mean"):
        np.testing.assert_allclose([h[key] for h in l2 if key in h], [h[key] for h in l1 if key in h], rtol=1e-5)
    acc1 = [h["eval_accuracy"] for h in l1 if "eval_accuracy" in h]
    acc2 = [h["eval_accuracy"] for h in l2 if "eval_accuracy" in h]
    assert acc1 == acc2 and len(acc1) == 1


def test_resuming_from_a_checkpoint_continues_the_same_run(clip, data, tmp_path):
    """Streams are replayed from the seed, optimizer/scheduler restored: 2 + 2 resumed steps == 4 steps."""
    straight = fresh_model(clip)
    CMKDTrainer(straight, make_args(tmp_path / "a", max_steps=4), data["source"], data["target"]).train()
    args = make_args(tmp_path / "b", max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=None)
    CMKDTrainer(fresh_model(clip), args, data["source"], data["target"]).train()
    resumed = fresh_model(clip)
    trainer = CMKDTrainer(resumed, args, data["source"], data["target"])
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    for p, q in zip(resumed.parameters(), straight.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_resuming_from_the_final_checkpoint_trains_no_extra_step(clip, data, tmp_path):
    """A run killed after its last checkpoint resumes to the same model and log history (Trainer.train alone would
    take a max_steps+1-th step from it), and load_best_model_at_end still loads the best checkpoint."""
    kw = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2)
    args = make_args(tmp_path, load_best_model_at_end=True, save_total_limit=None, **kw)
    straight = fresh_model(clip)
    first = CMKDTrainer(straight, args, data["source"], data["target"])
    first.train()
    resumed = fresh_model(clip)
    trainer = CMKDTrainer(resumed, args, data["source"], data["target"])
    out = trainer.train(resume_from_checkpoint=True)
    assert out.global_step == trainer.state.global_step == 4
    evals = [h["step"] for h in trainer.state.log_history if "eval_accuracy" in h]
    assert evals == [h["step"] for h in first.state.log_history if "eval_accuracy" in h] == [2, 4]
    assert trainer.state.best_model_checkpoint == first.state.best_model_checkpoint
    for p, q in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(p, q)


# ----------------------------------------------------------------------------------------------- learning
LEARNING_STEPS = 150


def _digits_accuracy(mode: str, clip, tokenizer, shift, tmp_path) -> float:
    """Train on the toy digits shift (clean source -> styled target); final target accuracy of the task head."""
    from cmkd.toy import DIGITS_PROMPT

    transform = image_transform(32, train=False)
    source = with_image_transform(shift["source"], transform)
    target = with_image_transform(shift["target"], transform)
    torch.manual_seed(0)
    names = shift["source"].features["label"].names  # the demo task's label names (cmkd.toy.TASK_CLASSES)
    model = CLIPAdaptationModel.from_clip(clip, names, DIGITS_PROMPT, tokenizer=tokenizer)
    args = make_args(
        tmp_path / mode,
        mode=mode,
        max_steps=LEARNING_STEPS,
        per_device_train_batch_size=32,
        learning_rate=1e-3,
        head_lr_multiplier=10.0,
        logging_steps=50,
        eval_strategy="steps",
        eval_steps=LEARNING_STEPS,
        seed=0,
    )
    # The release's warm-up spans the whole run (max_iter = iterations); so does this short one.
    cfg = CMKDConfig(warmup_max_iter=LEARNING_STEPS)
    trainer = CMKDTrainer(model, args, source_dataset=source, target_dataset=target, cmkd_config=cfg)
    trainer.train()
    return [h["eval_accuracy"] for h in trainer.state.log_history if "eval_accuracy" in h][-1]


@pytest.mark.slow
def test_cmkd_beats_source_only_on_the_digits_shift(tmp_path):
    """Shipped tiny CLIP, clean -> styled digits, 150 steps each: CMKD's target accuracy beats source-only by >= 5
    points (measured on the demo task's label names: 65.0 % -> 72.6 % with these seeds)."""
    from transformers import AutoTokenizer

    from cmkd import toy

    clip = CLIPModel.from_pretrained(toy.TINY_CLIP_PATH).eval()
    tokenizer = AutoTokenizer.from_pretrained(toy.TINY_CLIP_PATH)
    shift = toy.make_digits_shift(seed=0)
    source_only = _digits_accuracy("source_only", clip, tokenizer, shift, tmp_path)
    cmkd = _digits_accuracy("cmkd", clip, tokenizer, shift, tmp_path)
    print(f"digits shift, target accuracy: source-only {source_only:.3f}, CMKD {cmkd:.3f}")
    assert cmkd >= source_only + 0.05, (source_only, cmkd)


# ----------------------------------------------------------------------------------------------- divergence
class PoisonAt(TrainerCallback):
    """Turns one head weight into ``value`` before step ``step`` (1-based): the next loss is non-finite."""

    def __init__(self, step: int, value: float = float("nan")):
        self.step, self.value = step, value

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 == self.step:
            with torch.no_grad():
                model.head.classifier.weight[0, 0] = self.value


def _saved(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {name: load_file(folder / name) for name in ("model.safetensors",)}


@pytest.mark.parametrize("mode", ["cmkd", "source_only"])
def test_a_non_finite_loss_stops_training_naming_step_and_term_and_keeps_the_last_checkpoint(
    clip, data, tmp_path, mode
):
    from cmkd import TrainingDivergedError, checkpoint_problems

    args = make_args(tmp_path, mode=mode, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=1)
    trainer = CMKDTrainer(
        fresh_model(clip),
        args,
        source_dataset=data["source"],
        target_dataset=data["target"],
        callbacks=[PoisonAt(step=3)],
    )
    with pytest.raises(TrainingDivergedError) as exc:
        trainer.train()
    message = str(exc.value)
    assert exc.value.step == 3 and "training diverged at step 3" in message
    assert "source cross-entropy (source_ce = nan)" in message  # the head feeds every term; CE is named first
    assert f"the last good checkpoint is {tmp_path / 'checkpoint-2'}" in message
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]  # nothing saved after it
    assert checkpoint_problems(tmp_path / "checkpoint-2") == []
    assert all(torch.isfinite(t).all() for t in _saved(tmp_path / "checkpoint-2")["model.safetensors"].values())


def test_non_finite_distillation_term_is_named(clip, data, tmp_path):
    """A NaN teacher (text features) poisons only the target-side CMKD terms, not the source CE."""
    from cmkd import TrainingDivergedError

    model = fresh_model(clip)
    model.text_features[0, 0] = float("nan")
    trainer = CMKDTrainer(model, make_args(tmp_path), source_dataset=data["source"], target_dataset=data["target"])
    with pytest.raises(TrainingDivergedError, match="training diverged at step 1: non-finite") as exc:
        trainer.train()
    assert "source_ce" not in exc.value.terms and "distill" in exc.value.terms
    assert "distillation term (distill = nan)" in str(exc.value)
    assert "no checkpoint was saved before" in str(exc.value)


class BlowUpUpdate(TrainerCallback):
    """Makes the optimizer update of step 1 put an inf into the projection, as an overflowing update would."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            with torch.no_grad():
                model.visual_projection.weight[0, 0] = float("inf")


def test_an_update_that_makes_weights_non_finite_stops_before_the_checkpoint(clip, data, tmp_path):
    """The loss of step 1 is finite, its update is not: stopped before checkpoint-1 is written."""
    from cmkd import TrainingDivergedError

    args = make_args(tmp_path, save_strategy="steps", save_steps=1)
    trainer = CMKDTrainer(
        fresh_model(clip),
        args,
        source_dataset=data["source"],
        target_dataset=data["target"],
        callbacks=[BlowUpUpdate()],
    )
    with pytest.raises(TrainingDivergedError) as exc:
        trainer.train()
    message = str(exc.value)
    assert "training diverged at step 1: 1 of" in message and "hold inf/NaN after the optimizer update" in message
    assert "(visual_projection.weight)" in message and "Lower the learning rate (now 0.001)" in message
    assert not list(tmp_path.glob("checkpoint-*"))


def test_the_guard_can_be_turned_off(clip, data, tmp_path):
    args = make_args(tmp_path, learning_rate=1e30, halt_on_nonfinite=False, max_steps=2)
    trainer = CMKDTrainer(fresh_model(clip), args, source_dataset=data["source"], target_dataset=data["target"])
    trainer.train()  # the user asked for it: no check, the weights are what the updates made them
    assert not all(torch.isfinite(p).all() for p in trainer.model.parameters())


# ----------------------------------------------------------------------------------------------- complete checkpoints
def test_resume_true_skips_a_half_written_checkpoint(clip, data, tmp_path, caplog):
    from cmkd import IncompleteCheckpointError, checkpoint_problems, last_complete_checkpoint

    args = make_args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, save_total_limit=None)
    CMKDTrainer(fresh_model(clip), args, source_dataset=data["source"], target_dataset=data["target"]).train()
    # a kill during checkpoint-4's save: weights and optimizer written, RNG state and trainer_state.json not yet
    (tmp_path / "checkpoint-4" / "trainer_state.json").unlink()
    (tmp_path / "checkpoint-4" / "rng_state.pth").unlink()
    assert checkpoint_problems(tmp_path / "checkpoint-4") == ["no trainer_state.json", "no rng_state.pth"]
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    truncated = tmp_path / "checkpoint-2" / "trainer_state.json"
    assert "truncated" not in " ".join(checkpoint_problems(truncated.parent))

    trainer = CMKDTrainer(fresh_model(clip), args, source_dataset=data["source"], target_dataset=data["target"])
    with caplog.at_level("WARNING"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 4
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-4" in caplog.text

    truncated.write_text(truncated.read_text()[:40])
    assert checkpoint_problems(truncated.parent) == ["trainer_state.json is truncated or not JSON"]
    again = CMKDTrainer(fresh_model(clip), args, source_dataset=data["source"], target_dataset=data["target"])
    with pytest.raises(IncompleteCheckpointError, match="checkpoint-2: not a complete Trainer checkpoint"):
        again.train(resume_from_checkpoint=str(truncated.parent))
