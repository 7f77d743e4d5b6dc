"""`import peft_rst` makes peft's public entry points handle RST, with peft's installed files left as released."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from peft import (
    AutoPeftModel,
    AutoPeftModelForFeatureExtraction,
    PeftConfig,
    PeftModel,
    PeftModelForFeatureExtraction,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTuner

import peft_rst
from peft_rst import IncompatiblePeftError, RSTConfig, RSTModel
from peft_rst._registration import check_peft_compatibility, register_rst

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_DIR = os.path.join(HERE, "fixtures", "rst_tiny_clip_adapter")


def _fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_rst_fixture", os.path.join(HERE, "fixtures", "make_rst_fixture.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installed_peft_files_are_unmodified():
    """Registration must not rely on edits to peft: every installed peft file matches the wheel's RECORD hash."""
    dist = importlib.metadata.distribution("peft")
    checked = 0
    for file in dist.files:
        if file.hash is None or not str(file).startswith("peft/"):
            continue
        assert file.hash.mode == "sha256"
        digest = base64.urlsafe_b64encode(hashlib.sha256(file.read_binary()).digest()).rstrip(b"=").decode()
        assert digest == file.hash.value, f"{file} differs from the released peft {dist.version}"
        checked += 1
    assert checked > 100
    assert peft.__version__ == dist.version


def test_peft_tables_know_rst():
    from peft import mapping

    assert mapping.PEFT_TYPE_TO_CONFIG_MAPPING["RST"] is RSTConfig
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["RST"] is RSTModel
    assert RSTConfig().peft_type == "RST"
    register_rst()  # idempotent
    assert mapping.PEFT_TYPE_TO_TUNER_MAPPING["RST"] is RSTModel


def test_conflicting_registration_is_refused(monkeypatch):
    from peft import mapping

    monkeypatch.setitem(mapping.PEFT_TYPE_TO_TUNER_MAPPING, "RST", BaseTuner)
    with pytest.raises(IncompatiblePeftError, match="already registered"):
        register_rst()


# ------------------------------------------------------------------------------------ the committed fixture folder
# Bitwise claims are made only about stored data: the committed base and adapter files, and what loading them gives.
# Retraining the adapter is compared within a tolerance: three SGD steps on another CPU (AVX-512, AVX2, or
# ATEN_CPU_CAPABILITY=default) round the reductions differently. Measured against the committed file (written on
# another machine): weights up to 1.2e-7 and outputs up to 4.2e-7 apart (AVX2 and default here; 3e-8 and 3.6e-7 on
# an AVX-512 machine). RETRAIN_ATOL leaves 8x room and is still 1000x below tau, the smallest change RST keeps;
# the output tolerance leaves 20x room.
RETRAIN_ATOL = 1e-6
OUTPUT_ATOL, OUTPUT_RTOL = 1e-5, 1e-5


def _file_name(key: str) -> str:
    """`base_model.model.a.base_layer.b.rst_weight.weight` (a file key without its suffix) -> `a.b.weight`."""
    name = key.removeprefix("base_model.model.").replace(".rst_weight.", ".")
    return name.replace(".base_layer.", ".")


def _decoded_fixture() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, W, head) read straight from the committed files with safetensors and peft_rst's format decoder.

    W of a targeted parameter is the stored base with the file's entries written at the file's positions.
    """
    from safetensors.torch import load_file

    from peft_rst.format import decode_sparse, tensor_fingerprint

    make = _fixture_module()
    base = load_file(os.path.join(make.BASE_DIR, "model.safetensors"))
    stored = load_file(os.path.join(FIXTURE_DIR, "adapter_model.safetensors"))
    weights, head = {}, {}
    for key in sorted(stored):
        if ".rst_weight." not in key:
            head[key.removeprefix("base_model.model.")] = stored[key]
            continue
        if not key.endswith(".idx"):
            continue
        stem = key.removesuffix(".idx")
        name = _file_name(stem)
        parts = {s: stored[f"{stem}.{s}"] for s in ("idx", "val") if f"{stem}.{s}" in stored}
        data = decode_sparse(parts, base[name].numel(), name)
        assert data.base_fingerprint == tensor_fingerprint(base[name]), f"{name}: the stored base is not the w0"
        w = base[name].flatten().clone()
        w[data.indices] = data.values
        weights[name] = w.view_as(base[name])
    return base, weights, head


def test_fixture_adapter_loads_the_files_tensors_bit_for_bit(rst_tools):
    """An adapter folder saved by an earlier commit loads back exactly (format and registration stay compatible):
    every loaded tensor equals what the files hold, bit for bit, on any machine."""
    from transformers import CLIPVisionModelWithProjection

    make = _fixture_module()
    config = PeftConfig.from_pretrained(FIXTURE_DIR)
    assert isinstance(config, RSTConfig) and config.tau == make.TAU
    assert config.modules_to_save == ["visual_projection"]
    base, expected, head = _decoded_fixture()
    assert "vision_model.embeddings.class_embedding" in expected and list(head) == ["visual_projection.weight"]
    assert sum(int((expected[n] != base[n]).sum()) for n in expected) > 1000  # the fixture trained something

    resumed = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR, is_trainable=True)
    weights = rst_tools.adapter_weights(resumed)
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert rst_tools.bitwise_equal(w.detach(), expected[name]), name
    saved = rst_tools.saved_module_weights(resumed)
    assert saved.keys() == head.keys()
    for name, p in saved.items():
        assert rst_tools.bitwise_equal(p.detach(), head[name]), name
    for name, w0 in rst_tools.base_weights(resumed).items():  # w0 stays the stored base
        assert rst_tools.bitwise_equal(w0.detach(), base[name]), name

    # Loaded for inference (entries written into the base), the model is a plain CLIP tower holding exactly the
    # decoded weights: same process, same kernels, same bits in, so the same bits out.
    reference = CLIPVisionModelWithProjection.from_pretrained(make.BASE_DIR).eval()
    reference.load_state_dict({**base, **expected, **head})
    loaded = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR)
    pixels = make.pixel_values(99)
    with torch.no_grad():
        out = loaded(pixel_values=pixels).image_embeds
        assert torch.equal(out, reference(pixel_values=pixels).image_embeds)
        assert not torch.equal(out, make.build_base()(pixel_values=pixels).image_embeds)


def test_retraining_the_fixture_reproduces_it_within_float_rounding(rst_tools):
    """Today's training code still produces the committed adapter: same entries changed, same values up to the
    rounding of another CPU (RETRAIN_ATOL), and the same outputs up to OUTPUT_ATOL/RTOL."""
    make = _fixture_module()
    base, expected, head = _decoded_fixture()
    trained = make.build_trained()
    weights = {**rst_tools.adapter_weights(trained), **rst_tools.saved_module_weights(trained)}
    assert weights.keys() == {**expected, **head}.keys()
    for name, w in weights.items():
        want = expected.get(name, head.get(name))
        torch.testing.assert_close(w.detach(), want, atol=RETRAIN_ATOL, rtol=0, msg=name)
        if name in expected:
            # the reset decisions agree: the same entries differ from w0 (the committed entry closest to tau is
            # 1.7e-6 above it, >50x the rounding measured across CPUs, so rounding alone cannot flip a decision)
            assert torch.equal(w.detach() != base[name], want != base[name]), name

    loaded = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR)
    pixels = make.pixel_values(99)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixels).image_embeds,
            trained(pixel_values=pixels).image_embeds,
            atol=OUTPUT_ATOL,
            rtol=OUTPUT_RTOL,
        )


# ---------------------------------------------------------------------------------------------- AutoPeftModel
@pytest.mark.parametrize("task_type", [None, "FEATURE_EXTRACTION"])
def test_auto_peft_model_from_a_local_base(rst_tools, tmp_path, task_type):
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "base")
    model = get_peft_model(BertModel.from_pretrained(tmp_path / "base"), RSTConfig(tau=1e-3, task_type=task_type))
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(rst_tools.trainable(model), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        model(input_ids=ids).last_hidden_state.square().mean().backward()
        opt.step()
    model.eval()
    expected = model(input_ids=ids).last_hidden_state
    model.save_pretrained(tmp_path / "adapter")
    assert PeftConfig.from_pretrained(tmp_path / "adapter").base_model_name_or_path == str(tmp_path / "base")

    auto_cls = AutoPeftModel if task_type is None else AutoPeftModelForFeatureExtraction
    loaded = auto_cls.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModelForFeatureExtraction if task_type else PeftModel)
    assert isinstance(loaded.base_model, RSTModel)
    assert torch.equal(loaded.eval()(input_ids=ids).last_hidden_state, expected)


# --------------------------------------------------------------------------------------- peft compatibility check
def test_too_old_peft_is_refused_with_its_version(monkeypatch):
    monkeypatch.setattr(peft, "__version__", "0.20.0")
    with pytest.raises(IncompatiblePeftError, match=r"0\.20\.0") as info:
        check_peft_compatibility()
    assert "pip install" in str(info.value)


@pytest.mark.parametrize("hook", ["_get_adapter_state_dict", "_remap_adapter_state_dict_for_load"])
def test_removed_peft_hook_is_named(monkeypatch, hook):
    monkeypatch.delattr(BaseTuner, hook)
    with pytest.raises(IncompatiblePeftError) as info:
        check_peft_compatibility()
    assert hook in str(info.value) and peft.__version__ in str(info.value)


def test_reshaped_peft_mapping_is_named(monkeypatch):
    from peft import mapping

    monkeypatch.delattr(mapping, "PEFT_TYPE_TO_PREFIX_MAPPING")
    with pytest.raises(IncompatiblePeftError, match="PEFT_TYPE_TO_PREFIX_MAPPING"):
        check_peft_compatibility()


_FRESH_INTERPRETER = textwrap.dedent(
    """
    import sys
    import peft
    from peft import PeftConfig, PeftModel

    fixture, make_path = sys.argv[1], sys.argv[2]
    try:  # without `import peft_rst`, peft does not know RST
        PeftConfig.from_pretrained(fixture)
        print("UNREGISTERED_LOAD_WORKED")
    except Exception:
        pass

    released = peft.__version__
    peft.__version__ = "0.19.1"
    try:
        import peft_rst
    except ImportError as err:
        print("IMPORT_ERROR:", type(err).__name__, err)
    for name in [m for m in sys.modules if m == "peft_rst" or m.startswith("peft_rst.")]:
        del sys.modules[name]
    peft.__version__ = released

    import importlib.util
    import json
    import torch
    from safetensors.torch import load_file
    import peft_rst  # noqa: F401  (this alone registers RST)

    spec = importlib.util.spec_from_file_location("make", make_path)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    config = PeftConfig.from_pretrained(fixture)
    model = PeftModel.from_pretrained(make.build_base(), fixture, is_trainable=True)
    head = model.base_model.model.visual_projection.modules_to_save["default"].weight
    stored = load_file(fixture + "/adapter_model.safetensors")["base_model.model.visual_projection.weight"]
    same = torch.equal(head.detach().view(torch.int32), stored.view(torch.int32))  # stored data: bit for bit
    print("LOADED", type(config).__name__, type(model.base_model).__name__, same)
    with torch.no_grad():
        print("OUTPUT", json.dumps(model.eval()(pixel_values=make.pixel_values(7)).image_embeds.tolist()))
    """
)


@pytest.mark.slow
def test_fresh_interpreter_import_registers_and_refuses_old_peft():
    """In a new process: RST is unknown before `import peft_rst`, the import fails clearly on a too-old peft, and
    once imported, PeftConfig / PeftModel.from_pretrained load the committed fixture (its head bit for bit)."""
    result = subprocess.run(
        [sys.executable, "-c", _FRESH_INTERPRETER, FIXTURE_DIR, os.path.join(HERE, "fixtures", "make_rst_fixture.py")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "UNREGISTERED_LOAD_WORKED" not in out
    assert "IMPORT_ERROR: IncompatiblePeftError" in out and "0.19.1" in out, out
    assert "LOADED RSTConfig RSTModel True" in out, out
    # The same load in this process gives the same outputs; not compared bitwise, since this process and the child
    # may run different thread counts (reductions split differently), the tolerance covers float rounding only.
    child = torch.tensor(json.loads(out.split("OUTPUT ", 1)[1]))
    make = _fixture_module()
    with torch.no_grad():
        loaded = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR)
        here = loaded(pixel_values=make.pixel_values(7)).image_embeds
    torch.testing.assert_close(child, here, atol=OUTPUT_ATOL, rtol=OUTPUT_RTOL)


def test_public_names():
    for name in ("RSTConfig", "RSTModel", "RSTLayer", "IncompatiblePeftError", "BaseWeightsMismatchError"):
        assert hasattr(peft_rst, name)
