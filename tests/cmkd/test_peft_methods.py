"""cmkd.peft_methods: each Table VII method trains exactly its parameters under CMKDTrainer, DSP, refusals."""

import copy

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from PIL import Image as PILImage
from safetensors.torch import load_file
from tiny_clip_models import CharTokenizer, tiny_clip

from cmkd import CLIPAdaptationModel, CMKDTrainer, CMKDTrainingArguments, image_transform, with_image_transform
from cmkd.peft_methods import (
    PEFT_LABELS,
    PEFT_METHODS,
    AdaLoraCallback,
    apply_peft,
    count_dsp,
    orthogonal_penalty,
    peft_callbacks,
)

NAMES = ["cat", "dog", "bird"]
STEPS = 4


def dataset(n: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [PILImage.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    features = Features({"image": Image(), "label": ClassLabel(names=NAMES)})
    raw = Dataset.from_dict({"image": images, "label": [i % 3 for i in range(n)]}, features=features)
    return with_image_transform(raw, image_transform(32, train=False))


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


@pytest.fixture(scope="module")
def data():
    return dataset(16, 0), dataset(16, 1)


def fresh(clip) -> CLIPAdaptationModel:
    torch.manual_seed(1)
    return CLIPAdaptationModel.from_clip(clip, NAMES, "a photo of a {}.", tokenizer=CharTokenizer())


OPTIONS = {"rst": {"tau": 1e-4}, "adalora": {"total_step": STEPS, "tinit": 0, "tfinal": 1}}


def train(model, data, tmp_path, steps=STEPS, **kwargs):
    args = CMKDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        head_lr_multiplier=10.0,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        use_cpu=True,
        disable_tqdm=True,
        report_to="none",
        seed=3,
    )
    trainer = CMKDTrainer(model, args, source_dataset=data[0], target_dataset=data[1], **kwargs)
    trainer.train()
    return trainer


def changed_names(before: dict, after: dict) -> set[str]:
    return {n for n, t in before.items() if not torch.equal(t, after[n])}


def plain_state(model) -> dict:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def head_param_names(model) -> set[str]:
    return {f"head.{n}" for n, _ in model.head.named_parameters()}


def head_stored(model) -> int:
    return sum(t.numel() for t in model.head.state_dict().values())


def lora_numel_by_formula(model, r: int) -> int:
    """r * (fan_in + fan_out) over q, k, v, out (H x H) and fc1, fc2 (H x I) of every encoder layer."""
    cfg = model.vision_model.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    return cfg.num_hidden_layers * r * (4 * 2 * h + 2 * (h + i))


@pytest.mark.parametrize("method", ["bitfit", "linear_probe", "full"])
def test_in_place_methods_change_exactly_their_parameters(clip, data, tmp_path, method):
    model = fresh(clip)
    before = plain_state(model)
    untouched = fresh(clip)
    assert apply_peft(model, method) is model
    train(model, data, tmp_path)
    changed = changed_names(before, plain_state(model))
    params = {n for n, _ in model.named_parameters()}
    heads = head_param_names(model)
    biases = {n for n in params if n.endswith(".bias") and n not in heads}
    expected = {"full": params, "bitfit": heads | biases, "linear_probe": heads}[method]
    assert changed & params == expected
    # buffers that change are the head's BatchNorm statistics only (it is in train mode in every method)
    assert {n for n in changed - params} <= {f"head.{n}" for n, _ in model.head.named_buffers()}
    all_params = sum(p.numel() for p in untouched.parameters())
    independent = {
        "full": all_params - sum(p.numel() for p in untouched.head.parameters()) + head_stored(untouched),
        "bitfit": sum(untouched.state_dict()[n].numel() for n in biases) + head_stored(untouched),
        "linear_probe": head_stored(untouched),
    }[method]
    assert count_dsp(model, method) == independent


def test_lora_trains_adapters_and_head_only(clip, data, tmp_path):
    untouched = fresh(clip)
    model = apply_peft(fresh(clip), "lora")
    train(model, data, tmp_path)
    merged = copy.deepcopy(model).merge_and_unload()
    base = model.get_base_model()
    # the base weights under the adapters stayed at w0; the head copy and every B matrix moved
    for name, p in untouched.named_parameters():
        if name.startswith("head."):
            continue
        owner, _, leaf = name.rpartition(".")
        wrapped = base.get_submodule(owner)
        weight = getattr(getattr(wrapped, "base_layer", wrapped), leaf)
        assert torch.equal(weight, p), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 6 and all(p.abs().sum() > 0 for p in lora_b)
    assert not torch.equal(merged.head.state_dict()["layer_norm.weight"], untouched.head.layer_norm.weight)
    targeted = {n for n, m in merged.named_modules() if n.rpartition(".")[2] in {"q_proj", "fc1", "fc2"}}
    moved = changed_names(plain_state(untouched), plain_state(merged))
    assert {n.rpartition(".")[0] for n in moved if not n.startswith("head.")} <= {
        n for n, m in merged.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert targeted  # the CLIP encoder's own layer names are adapted
    assert count_dsp(model, "lora") == lora_numel_by_formula(untouched, 1) + head_stored(untouched)
    one = apply_peft(fresh(clip), "lora", target_modules=["vision_model.encoder.layers.0.mlp.fc1"])
    assert count_dsp(one, "lora") == 32 + 64 + head_stored(untouched)  # r=1 x (hidden 32 + intermediate 64)
    apply_r4 = apply_peft(fresh(clip), "lora", r=4)
    assert count_dsp(apply_r4, "lora") == lora_numel_by_formula(untouched, 4) + head_stored(untouched)


def test_rst_changes_only_entries_past_tau_and_dsp_counts_them(clip, data, tmp_path):
    untouched = fresh(clip)
    model = apply_peft(fresh(clip), "rst", tau=1e-4)
    train(model, data, tmp_path)
    merged = copy.deepcopy(model).merge_and_unload()
    changed = 0
    for name, p in untouched.named_parameters():
        if name.startswith("head."):
            continue
        diff = (merged.get_parameter(name) - p).abs()
        assert torch.all((diff == 0) | (diff > 1e-4)), name
        changed += int((diff > 0).sum())
    assert changed > 0
    assert not torch.equal(merged.head.classifier.weight, untouched.head.classifier.weight)
    assert count_dsp(model, "rst") == changed + head_stored(untouched)


def test_adalora_allocates_ranks_and_dsp_matches_saved_adapter(clip, data, tmp_path):
    untouched = fresh(clip)
    model = apply_peft(fresh(clip), "adalora", total_step=STEPS, tinit=0, tfinal=1)
    trainer = train(model, data, tmp_path, callbacks=[AdaLoraCallback()])
    assert sum(isinstance(cb, AdaLoraCallback) for cb in trainer.callback_handler.callbacks) == 1
    pattern = model.peft_config["default"].rank_pattern
    assert pattern, "update_and_allocate never ran"
    kept = sum(sum(mask) for mask in pattern.values())
    assert kept == 6 * 1  # the budget: target rank 1 on average over the 6 adapted matrices
    for name, p in model.named_parameters():  # the pruned singular values are exactly zero
        if "lora_E" in name:
            mask = torch.tensor(pattern[name.removeprefix("base_model.model.")])
            assert torch.all(p.view(-1)[~mask] == 0)
    for name, p in untouched.named_parameters():
        if not name.startswith("head."):
            owner, _, leaf = name.rpartition(".")
            wrapped = model.get_base_model().get_submodule(owner)
            assert torch.equal(getattr(getattr(wrapped, "base_layer", wrapped), leaf), p)
    moved = [n for n, p in model.named_parameters() if p.requires_grad]
    start = apply_peft(fresh(clip), "adalora", total_step=STEPS, tinit=0, tfinal=1).state_dict()
    assert all(not torch.equal(model.state_dict()[n], start[n]) for n in moved if "lora_E" not in n)
    assert {n.split(".")[-2] for n in moved if "lora_" in n} == {"lora_A", "lora_B", "lora_E"}
    assert any("modules_to_save" in n for n in moved)  # the head copy trains
    model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    stored = sum(t.numel() for n, t in saved.items() if "lora_" in n)
    assert count_dsp(model, "adalora") == stored + head_stored(untouched)
    assert any("head" in n for n in saved)


def test_adalora_penalty_gradient_is_the_one_peft_adds_to_a_model_computed_loss(clip, data):
    pixels = torch.randn(4, 3, 32, 32)
    labels = torch.tensor([0, 1, 2, 0])
    models = [apply_peft(fresh(clip), "adalora", total_step=10) for _ in range(2)]
    for m in models:
        for n, p in m.named_parameters():  # break A/B orthogonality so the penalty has a gradient
            if "lora_" in n:
                torch.manual_seed(len(n))
                p.data.normal_()
    models[1].load_state_dict(models[0].state_dict())
    # AdaLoraModel.forward adds 0.5 * R to a loss the model computes (PeftModel.forward of a model without a
    # peft task type calls the base model directly, so the reference calls the tuner's own forward)
    models[0].train().base_model(pixel_values=pixels, labels=labels).loss.backward()
    out = models[1].train()(pixel_values=pixels)
    torch.nn.functional.cross_entropy(out.logits, labels).backward()
    args = CMKDTrainingArguments(output_dir="unused", use_cpu=True, report_to="none")
    AdaLoraCallback().on_step_begin(args, None, None, model=models[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.grad is not None} for m in models]
    assert grads[0].keys() == grads[1].keys() and any("lora_A" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], msg=n)
    assert orthogonal_penalty(models[1].base_model) > 0
    assert peft_callbacks(models[1])[0].__class__ is AdaLoraCallback and peft_callbacks(fresh(clip)) == []


def test_unknown_method_lists_the_choices(clip):
    with pytest.raises(
        ValueError, match="unknown PEFT method 'loraa'.*rst, lora, adalora, bitfit, linear_probe, full"
    ):
        apply_peft(fresh(clip), "loraa")
    with pytest.raises(ValueError, match="choose one of"):
        count_dsp(fresh(clip), "prefix")
    assert set(PEFT_LABELS) == set(PEFT_METHODS)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("lora", {"rank": 4}, "LoraConfig has no option 'rank'"),
        ("lora", {"target_modules": ["query"]}, r"match no linear layer.*fc1"),
        ("lora", {"modules_to_save": []}, "leaves out 'head'"),
        ("adalora", {}, "needs total_step"),
        ("adalora", {"total_step": 10, "tinit": 9, "tfinal": 5}, "invalid 'adalora' options"),
        ("rst", {"tau": -1.0}, "invalid 'rst' options"),
        ("rst", {"target_modules": ["query"]}, "'query' matches no module"),
        ("bitfit", {"r": 1}, "takes no options"),
        ("full", {"tau": 1e-6}, "takes no options"),
    ],
)
def test_bad_options_are_refused_and_leave_the_model_unchanged(clip, method, options, message):
    model = fresh(clip)
    before = plain_state(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match=message):
        apply_peft(model, method, **options)
    assert changed_names(before, plain_state(model)) == set()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [type(m) for m in model.modules()] == modules


def test_refuses_an_already_adapted_model_and_a_mismatched_count(clip):
    lora = apply_peft(fresh(clip), "lora")
    with pytest.raises(TypeError, match="already adapted"):
        apply_peft(lora, "rst")
    with pytest.raises(ValueError, match=r"apply_peft\(model, 'adalora'\)"):
        count_dsp(lora, "adalora")


@pytest.mark.parametrize("method", ["rst", "lora"])
def test_rst_under_deepspeed_is_refused_and_other_methods_are_not(clip, data, tmp_path, method):
    """ZeRO steps flattened copies of the weights, so RST's reset would never run: refused before anything is built.
    DeepSpeed is not installed here, so the config is set on arguments built without it."""
    model = apply_peft(fresh(clip), method, **OPTIONS.get(method, {}))
    args = CMKDTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        eval_strategy="no",
        save_strategy="no",
        load_best_model_at_end=False,
        use_cpu=True,
        report_to="none",
    )
    args.deepspeed = {"zero_optimization": {"stage": 2}}
    before = plain_state(model)
    if method == "rst":
        with pytest.raises(ValueError, match="cannot be trained under DeepSpeed.*FSDP2"):
            CMKDTrainer(model, args, source_dataset=data[0], target_dataset=data[1])
        assert changed_names(before, plain_state(model)) == set()
    else:
        CMKDTrainer(model, args, source_dataset=data[0], target_dataset=data[1])


def test_adalora_with_best_checkpoint_loading_is_refused_before_training(clip, data, tmp_path):
    """peft resizes a reloaded AdaLoRA adapter by the current (pruned) rank pattern: loading the best checkpoint at
    the end would fail after the whole run, so the trainer refuses at once and the model is untouched."""
    model = apply_peft(fresh(clip), "adalora", **OPTIONS["adalora"])
    args = CMKDTrainingArguments(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, use_cpu=True, report_to="none"
    )
    assert args.load_best_model_at_end  # the label-free validator selection is the default
    before = plain_state(model)
    with pytest.raises(ValueError, match="AdaLoRA cannot load its best checkpoint.*load_best_model_at_end=False"):
        CMKDTrainer(model, args, source_dataset=data[0], target_dataset=data[1])
    assert changed_names(before, plain_state(model)) == set()
