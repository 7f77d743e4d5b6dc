"""The PEFT contract every built-in tuner honours, checked for RST, plus the sparse saved form."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from torch import nn

from peft_rst import RSTConfig

TAU = 1e-3


def _tiny_clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=16, patch_size=8,
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    return CLIPVisionModelWithProjection(config).eval()


class _Head(nn.Module):
    """MLP body + task head, the shape of the paper's model (encoder + head in modules_to_save)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


def _base():
    torch.manual_seed(0)
    return _Head()


def _x():
    return torch.randn(5, 6, generator=torch.Generator().manual_seed(7))


def _train(rst_tools, model, steps=3, lr=0.05, seed=1):
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=lr, momentum=0.9)
    rst_tools.run_steps(model, opt, rst_tools.batches(steps, rst_tools.mlp_batch, seed=seed))
    model.eval()
    return opt


def _trained(rst_tools, **config):
    model = get_peft_model(_base(), RSTConfig(tau=TAU, modules_to_save=["head"], **config))
    _train(rst_tools, model)
    return model


def _assert_changed_some(rst_tools, model, adapter="default"):
    bases = rst_tools.base_weights(model)
    changed = sum(int((w != bases[n]).sum()) for n, w in rst_tools.adapter_weights(model, adapter).items())
    assert changed > 0


# ------------------------------------------------------------------------------------- base weights and disabling
def test_base_weights_untouched_and_disable_adapter_is_exact(rst_tools):
    pristine = _base().eval()
    model = _trained(rst_tools)
    _assert_changed_some(rst_tools, model)
    for name, w0 in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w0, pristine.get_parameter(name)), name
    x = _x()
    adapted = model(x)
    assert not torch.equal(adapted, pristine(x))
    with model.disable_adapter():
        assert torch.equal(model(x), pristine(x))
    assert torch.equal(model(x), adapted)


def test_init_weights_false_is_not_identity(rst_tools):
    pristine = _base().eval()
    model = get_peft_model(_base(), RSTConfig(init_weights=False)).eval()
    x = _x()
    assert not torch.equal(model(x), pristine(x))
    bases = rst_tools.base_weights(model)
    for name, w in rst_tools.adapter_weights(model).items():
        assert (w != bases[name]).any(), name
    with model.disable_adapter():
        assert torch.equal(model(x), pristine(x))


# ------------------------------------------------------------------------------------------------------- merging
def test_merge_and_unload_gives_a_plain_model_with_adapted_outputs(rst_tools):
    """CLIP's vision embeddings own a bare parameter and wrapped children: nested RST layers must all go."""
    from transformers import CLIPVisionModelWithProjection

    model = get_peft_model(_tiny_clip_vision(), RSTConfig(tau=TAU))
    pixel_values = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(pixel_values=pixel_values).image_embeds.square().mean().backward()
        opt.step()
    _assert_changed_some(rst_tools, model)
    weights = rst_tools.snapshot(rst_tools.adapter_weights(model))
    adapted = model(pixel_values=pixel_values).image_embeds

    merged = model.merge_and_unload()
    assert type(merged) is CLIPVisionModelWithProjection
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("rst" in n or "base_layer" in n for n, _ in merged.named_parameters())
    params = dict(merged.named_parameters())
    assert params.keys() == weights.keys()
    for name, w in weights.items():
        assert rst_tools.bitwise_equal(params[name], w), name
    assert torch.equal(merged(pixel_values=pixel_values).image_embeds, adapted)


def test_merge_unmerge_round_trip_is_bitwise(rst_tools):
    pristine = _base().eval()
    model = _trained(rst_tools)
    x = _x()
    adapted = model(x)
    weights = rst_tools.snapshot(rst_tools.adapter_weights(model))
    model.merge_adapter()
    bases = rst_tools.base_weights(model)
    for name, w in weights.items():
        assert rst_tools.bitwise_equal(bases[name], w), name
    assert torch.equal(model(x), adapted)
    model.unmerge_adapter()
    for name, w0 in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w0, pristine.get_parameter(name)), name
    assert torch.equal(model(x), adapted)


def test_safe_merge_refuses_nan_and_leaves_base_intact(rst_tools):
    pristine = _base().eval()
    model = _trained(rst_tools)
    with torch.no_grad():
        rst_tools.adapter_weights(model)["body.3.weight"].view(-1)[5] = float("nan")
    with pytest.raises(ValueError, match="(?i)nan"):
        model.merge_and_unload(safe_merge=True)
    for name, w0 in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w0, pristine.get_parameter(name)), name


def test_merging_two_adapters_adds_their_deltas_and_unmerges_bitwise(rst_tools):
    pristine = _base()
    model = get_peft_model(_base(), RSTConfig(tau=TAU))
    model.add_adapter("other", RSTConfig(tau=TAU))
    w0 = pristine.body[0].weight.detach()
    with torch.no_grad():
        rst_tools.adapter_weights(model, "default")["body.0.weight"][0, 0] += 0.5
        rst_tools.adapter_weights(model, "other")["body.0.weight"][0, 0] += 0.25
        rst_tools.adapter_weights(model, "other")["body.0.weight"][1, 1] += 0.125
    model.base_model.merge_adapter(["default", "other"])
    merged = rst_tools.base_weights(model)["body.0.weight"]
    expected = w0.clone()
    expected[0, 0] = (w0[0, 0] + 0.5) + ((w0[0, 0] + 0.25) - w0[0, 0])
    expected[1, 1] = w0[1, 1] + ((w0[1, 1] + 0.125) - w0[1, 1])
    assert torch.equal(merged, expected)
    model.base_model.unmerge_adapter()
    for name, w in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w, pristine.get_parameter(name)), name


# ------------------------------------------------------------------------------------------- several adapters
def test_several_adapters_add_set_train_delete(rst_tools):
    pristine = _base().eval()
    model = _trained(rst_tools)
    x = _x()
    out_default = model(x)
    default_weights = rst_tools.snapshot(rst_tools.adapter_weights(model))

    model.add_adapter("other", RSTConfig(tau=TAU, modules_to_save=["head"]))
    model.set_adapter("other")
    assert torch.equal(model(x), pristine(x))  # a fresh adapter is the identity
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".other." in n for n in trainable)
    _train(rst_tools, model, seed=2)
    _assert_changed_some(rst_tools, model, "other")
    out_other = model(x)
    assert not torch.equal(out_other, out_default)
    for name, w in rst_tools.adapter_weights(model, "default").items():
        assert rst_tools.bitwise_equal(w, default_weights[name]), f"training 'other' changed 'default' ({name})"

    model.set_adapter("default")
    assert torch.equal(model(x), out_default)
    model.delete_adapter("other")
    assert not any(".other." in n for n, _ in model.named_parameters())
    assert list(model.peft_config) == ["default"]
    assert torch.equal(model(x), out_default)
    _train(rst_tools, model, steps=1)  # the reset hook still works for the remaining adapter
    assert model.base_model.reset_step() == 4
    rst_tools.assert_reset_invariant(model, TAU)


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_adapter_added_later_is_reset_too(rst_tools, tmp_path, how):
    model = _trained(rst_tools)
    if how == "add_adapter":
        model.add_adapter("other", RSTConfig(tau=TAU, modules_to_save=["head"]))
    else:
        model.save_pretrained(tmp_path)
        model.load_adapter(tmp_path, adapter_name="other", is_trainable=True)
    model.set_adapter("other")
    _train(rst_tools, model, seed=2)
    rst_tools.assert_reset_invariant(model, TAU, "other")
    assert model.base_model.reset_step("other") == 3
    assert model.base_model.reset_step("default") == 3  # unchanged by training "other"


def test_load_adapter_next_to_another(rst_tools, tmp_path):
    trained = _trained(rst_tools)
    x = _x()
    expected = trained(x)
    trained.save_pretrained(tmp_path)

    model = get_peft_model(_base(), RSTConfig(tau=TAU, modules_to_save=["head"])).eval()
    identity = model(x)
    model.load_adapter(tmp_path, adapter_name="loaded")
    model.set_adapter("loaded")
    assert torch.equal(model(x), expected)
    model.set_adapter("default")
    assert torch.equal(model(x), identity)
    model.delete_adapter("loaded")
    assert torch.equal(model(x), identity)
    with model.disable_adapter():
        assert torch.equal(model(x), _base().eval()(x))


# ----------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_base_models(rst_tools, dtype):
    base = _base().to(dtype)
    pristine = _base().to(dtype).eval()
    model = get_peft_model(base, RSTConfig(tau=TAU, modules_to_save=["head"]))
    x = _x().to(dtype)
    out = model(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.05)
    for inputs, labels in rst_tools.batches(2, rst_tools.mlp_batch):
        opt.zero_grad()
        nn.functional.cross_entropy(model(inputs.to(dtype)).float(), labels).backward()
        opt.step()
    assert model.base_model.reset_step() == 2
    rst_tools.assert_reset_invariant(model, TAU)
    _assert_changed_some(rst_tools, model)
    for name, w0 in rst_tools.base_weights(model).items():
        assert rst_tools.bitwise_equal(w0, pristine.get_parameter(name)), name
    model.eval()
    with model.disable_adapter():
        assert torch.equal(model(x), pristine(x))


# ---------------------------------------------------------------------------------------------- save and load
@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_save_load_round_trip_is_bitwise(rst_tools, tmp_path, low_cpu_mem_usage):
    trained = _trained(rst_tools)
    x = _x()
    expected = trained(x)
    weights = rst_tools.snapshot(rst_tools.adapter_weights(trained))
    head = rst_tools.snapshot(rst_tools.saved_module_weights(trained))
    trained.save_pretrained(tmp_path)

    loaded = PeftModel.from_pretrained(_base(), tmp_path, low_cpu_mem_usage=low_cpu_mem_usage).eval()
    assert torch.equal(loaded(x), expected)
    with loaded.disable_adapter():
        assert torch.equal(loaded(x), _base().eval()(x))

    resumed = PeftModel.from_pretrained(_base(), tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage)
    for name, w in rst_tools.adapter_weights(resumed).items():
        assert rst_tools.bitwise_equal(w, weights[name]), name
    for name, p in rst_tools.saved_module_weights(resumed).items():
        assert rst_tools.bitwise_equal(p, head[name]), name
    assert torch.equal(resumed.eval()(x), expected)


def test_unload_of_a_loaded_adapter_returns_the_pretrained_weights(rst_tools, tmp_path):
    _trained(rst_tools).save_pretrained(tmp_path)
    pristine = _base()
    loaded = PeftModel.from_pretrained(_base(), tmp_path).eval()
    loaded(_x())
    plain = loaded.unload()
    for name, p in plain.named_parameters():
        if not name.startswith("head."):
            assert rst_tools.bitwise_equal(p, pristine.get_parameter(name)), name


def test_resume_training_keeps_pretrained_w0(rst_tools, tmp_path):
    """After loading with is_trainable=True, training continues exactly as if never saved, measuring from w0."""
    original = _trained(rst_tools)
    original.save_pretrained(tmp_path)
    resumed = PeftModel.from_pretrained(_base(), tmp_path, is_trainable=True)
    pristine = _base()
    for name, w0 in rst_tools.base_weights(resumed).items():
        assert rst_tools.bitwise_equal(w0, pristine.get_parameter(name)), f"w0 of {name} is not the pretrained value"

    for model in (original, resumed):  # same fresh optimizer and data for both
        _train(rst_tools, model, steps=2, seed=5)
    for name, w in rst_tools.adapter_weights(resumed).items():
        assert rst_tools.bitwise_equal(w, rst_tools.adapter_weights(original)[name]), name
    rst_tools.assert_reset_invariant(resumed, TAU)

    # an entry the loaded adapter had moved, pushed back within tau of the PRETRAINED value, is reset to it
    bases = rst_tools.base_weights(resumed)
    name, w = next((n, w) for n, w in rst_tools.adapter_weights(resumed).items() if (w != bases[n]).any())
    i = int(torch.nonzero((w != bases[name]).view(-1))[0])
    opt = torch.optim.SGD([w], lr=0.0)
    with torch.no_grad():
        w.view(-1)[i] = bases[name].view(-1)[i] + TAU / 2
    opt.step()
    assert rst_tools.bitwise_equal(w.view(-1)[i], pristine.get_parameter(name).view(-1)[i])


# ------------------------------------------------------------------------------------------------ saved form
def _safetensors_header(path: str) -> dict:
    """Parse the file by hand: 8-byte little-endian header length, then a JSON header (no pickle anywhere)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def test_saved_adapter_is_sparse_safetensors(rst_tools, tmp_path):
    model = _trained(rst_tools)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    path = os.path.join(tmp_path, "adapter_model.safetensors")
    header = _safetensors_header(path)
    header.pop("__metadata__", None)
    bases = rst_tools.base_weights(model)
    weights = rst_tools.adapter_weights(model)
    changed = {n: int((w != bases[n]).sum()) for n, w in weights.items()}
    assert 0 < sum(changed.values()) < 0.9 * sum(w.numel() for w in weights.values())
    rst_bytes = 0
    for key, info in header.items():
        if key.startswith("base_model.model.head."):  # modules_to_save: the dense task head, saved whole by design
            continue
        if key == "rst_integrity":  # the file's checksums (docs/adapter-format.md): ~60 bytes per tensor
            assert info["dtype"] == "U8" and info["shape"][0] <= 120 * len(header), info
            continue
        module, marker, tail = key.removeprefix("base_model.model.").partition(".rst_weight.")
        assert marker, f"unexpected tensor {key} in an RST adapter file"
        param, _, part = tail.rpartition(".")
        name = f"{module}.{param}"
        assert len(info["shape"]) == 1 and tuple(info["shape"]) != tuple(bases[name].shape), key
        n = info["shape"][0]
        if part == "val":  # exactly the changed values, in the parameter's dtype
            assert info["dtype"] == "F32" and n == changed[name], (key, n, changed[name])
        else:  # header and positions: bytes
            assert info["dtype"] in ("U8", "U16") and n <= 64 + 8 * changed[name], (key, info)
        start, end = info["data_offsets"]
        rst_bytes += end - start
    assert rst_bytes <= 64 * len(weights) + 8 * sum(changed.values())
    with safe_open(path, "pt") as f:  # and the dense head is there whole
        assert torch.equal(
            f.get_tensor("base_model.model.head.weight"), rst_tools.saved_module_weights(model)["head.weight"]
        )


def test_saved_size_grows_with_changed_entries_not_with_the_model(rst_tools, tmp_path):
    """Same number of changed entries in a 64x larger layer: the file barely grows (O(changed), not O(numel))."""
    sizes = {}
    for width in (16, 1024):
        model = get_peft_model(nn.Sequential(nn.Linear(width, 16, bias=False)), RSTConfig())
        ((name, w),) = rst_tools.adapter_weights(model).items()
        with torch.no_grad():
            w.view(-1)[torch.arange(0, 200, 2)] += 1.0  # 100 changed entries
        model.save_pretrained(tmp_path / str(width))
        header = _safetensors_header(str(tmp_path / str(width) / "adapter_model.safetensors"))
        header.pop("__metadata__", None)
        record = header.pop("rst_integrity")  # the checksums: per tensor of the file, not per entry
        assert record["shape"][0] <= 120 * len(header)
        sizes[width] = sum(i["data_offsets"][1] - i["data_offsets"][0] for i in header.values())
    for size in sizes.values():  # the 100 values, at most 2 bytes of position each, one small header
        assert 100 * 4 <= size <= 100 * (4 + 2) + 64, sizes
    assert sizes[1024] < 0.05 * 1024 * 16 * 4
