"""`import peft_rst` makes peft's public entry points handle RST, with peft's installed files left as released."""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import importlib.util
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
def test_fixture_adapter_loads_bitwise_into_the_regenerated_model(rst_tools):
    """An adapter folder saved by an earlier commit loads back exactly (format and registration stay compatible)."""
    make = _fixture_module()
    trained = make.build_trained()
    config = PeftConfig.from_pretrained(FIXTURE_DIR)
    assert isinstance(config, RSTConfig) and config.tau == make.TAU
    assert config.modules_to_save == ["visual_projection"]

    pixels = make.pixel_values(99)
    expected = trained(pixel_values=pixels).image_embeds
    loaded = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR)
    assert torch.equal(loaded(pixel_values=pixels).image_embeds, expected)

    resumed = PeftModel.from_pretrained(make.build_base(), FIXTURE_DIR, is_trainable=True)
    weights = rst_tools.adapter_weights(resumed)
    trained_weights = rst_tools.adapter_weights(trained)
    assert weights.keys() == trained_weights.keys() and "vision_model.embeddings.class_embedding" in weights
    for name, w in weights.items():
        assert rst_tools.bitwise_equal(w, trained_weights[name]), name
    for name, p in rst_tools.saved_module_weights(resumed).items():
        assert rst_tools.bitwise_equal(p, rst_tools.saved_module_weights(trained)[name]), name


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
    import torch
    import peft_rst  # noqa: F401  (this alone registers RST)

    spec = importlib.util.spec_from_file_location("make", make_path)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    config = PeftConfig.from_pretrained(fixture)
    model = PeftModel.from_pretrained(make.build_base(), fixture)
    same = torch.equal(
        model(pixel_values=make.pixel_values(7)).image_embeds,
        make.build_trained()(pixel_values=make.pixel_values(7)).image_embeds,
    )
    print("LOADED", type(config).__name__, type(model.base_model).__name__, same)
    """
)


@pytest.mark.slow
def test_fresh_interpreter_import_registers_and_refuses_old_peft():
    """In a new process: RST is unknown before `import peft_rst`, the import fails clearly on a too-old peft, and
    once imported, PeftConfig / PeftModel.from_pretrained load the committed fixture."""
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


def test_public_names():
    for name in ("RSTConfig", "RSTModel", "RSTLayer", "IncompatiblePeftError", "BaseWeightsMismatchError"):
        assert hasattr(peft_rst, name)
