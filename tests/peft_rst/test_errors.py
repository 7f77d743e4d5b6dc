"""Bad input fails early with a message that says what is wrong and what to do."""

from __future__ import annotations

import os
import re
import shutil

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from peft_rst import BaseWeightsMismatchError, RSTConfig, RSTLayer


def _base(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))


# ---------------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"tau": -1e-6}, ValueError, r"tau must be >= 0, got -1e-06"),
        ({"tau": float("nan")}, ValueError, r"tau must be a finite number"),
        ({"tau": float("inf")}, ValueError, r"tau must be a finite number"),
        ({"tau": "1e-6"}, TypeError, r"tau must be a number, got str"),
        ({"tau_schedule": "cosine"}, ValueError, r"tau_schedule must be one of .*'linear'"),
        ({"tau_schedule": "linear"}, ValueError, r"needs tau_end and schedule_steps \(e\.g\. RSTConfig\("),
        ({"tau_end": 1e-5}, ValueError, r"tau_end is only used with tau_schedule='linear' or 'exponential'"),
        (
            {"tau": 0.0, "tau_end": 1e-5, "tau_schedule": "exponential", "schedule_steps": 10},
            ValueError,
            r"tau > 0 and tau_end > 0; use 'linear'",
        ),
        ({"keep_ratio": 2.0}, ValueError, r"fraction in \(0, 1\], got 2\.0 \(0\.002 means 0\.2 %\)"),
        ({"keep_ratio": 0.0}, ValueError, r"keep_ratio must be > 0"),
        ({"keep_ratio": 0.5, "keep_ratio_end": 0.1}, ValueError, r"keep_ratio_end needs schedule_steps"),
        ({"keep_ratio_end": 0.1}, ValueError, r"keep_ratio_end needs keep_ratio"),
        ({"keep_ratio": 0.5, "bias_only": True}, ValueError, r"different RST variants; choose one"),
        ({"schedule_steps": 0}, ValueError, r"schedule_steps must be a positive integer"),
    ],
)
def test_bad_config_values(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        RSTConfig(**kwargs)


def test_targets_matching_nothing():
    with pytest.raises(ValueError, match=r"target_modules entry 'encoder' matches no module.*named_modules"):
        get_peft_model(_base(), RSTConfig(target_modules=["encoder"]))
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(_base(), RSTConfig(target_modules=["0"], exclude_modules=["0"]))
    with pytest.raises(ValueError, match="matches no module"):
        get_peft_model(_base(), RSTConfig(target_modules=r"layer\.\d+"))


def test_top_level_bare_parameter_is_refused_with_a_fix():
    class WithScale(nn.Module):
        def __init__(self):
            super().__init__()
            self.logit_scale = nn.Parameter(torch.tensor(2.0))
            self.lin = nn.Linear(3, 3)

    with pytest.raises(ValueError, match=r"owns parameters directly \(logit_scale\).*buffers.*modules_to_save"):
        get_peft_model(WithScale(), RSTConfig())
    model = get_peft_model(WithScale(), RSTConfig(target_modules=["lin"]))  # the suggested way out works
    assert isinstance(model.base_model.model.lin, RSTLayer)


# -------------------------------------------------------------------------------------------- adapter folders
@pytest.fixture
def folders(tmp_path):
    get_peft_model(_base(), LoraConfig(target_modules=["0", "2"], r=2, init_lora_weights=False)).save_pretrained(
        tmp_path / "lora"
    )
    rst = get_peft_model(_base(), RSTConfig(init_weights=False))
    rst.save_pretrained(tmp_path / "rst")
    return tmp_path


def test_lora_folder_loaded_as_rst(folders):
    with pytest.raises(ValueError, match=r"no entry for .*another PEFT method.*with its own adapter_config\.json"):
        PeftModel.from_pretrained(_base(), folders / "lora", config=RSTConfig())


def test_lora_weights_under_an_rst_config(folders):
    mixed = folders / "mixed"
    mixed.mkdir()
    shutil.copy(folders / "rst" / "adapter_config.json", mixed)
    shutil.copy(folders / "lora" / "adapter_model.safetensors", mixed)
    with pytest.raises(ValueError, match=r"another PEFT method"):
        PeftModel.from_pretrained(_base(), mixed)


def test_lora_folder_as_second_adapter_of_an_rst_model(folders):
    model = get_peft_model(_base(), RSTConfig())
    with pytest.raises(ValueError, match=r"different peft types.*LORA"):
        model.load_adapter(folders / "lora", adapter_name="lora")


def test_rst_config_from_a_lora_folder(folders):
    with pytest.raises(ValueError, match=r"(?i)lora.*not.*rst|rst.*lora"):
        RSTConfig.from_pretrained(folders / "lora")


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json' at .*nowhere"):
        PeftModel.from_pretrained(_base(), tmp_path / "nowhere")


def test_missing_weights_file_names_the_folder(folders):
    os.remove(folders / "rst" / "adapter_model.safetensors")
    with pytest.raises(Exception, match=re.escape(str(folders / "rst"))):
        PeftModel.from_pretrained(_base(), str(folders / "rst"))


def test_missing_weights_file_says_which_file(folders):
    os.remove(folders / "rst" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors.*save_pretrained"):
        PeftModel.from_pretrained(_base(), str(folders / "rst"))


def test_other_base_weights_are_refused_and_the_advice_works(folders):
    other = _base(seed=1)
    with pytest.raises(BaseWeightsMismatchError, match=r"trained from different base weights.*check_base_fingerprint"):
        PeftModel.from_pretrained(other, folders / "rst")
    assert not any(isinstance(m, RSTLayer) for m in other.modules()), (
        "a refused adapter must leave the model as it was"
    )
    # the message's own recipe loads it anyway
    cfg = PeftConfig.from_pretrained(folders / "rst")
    cfg.check_base_fingerprint = False
    loaded = PeftModel.from_pretrained(other, folders / "rst", config=cfg)
    assert isinstance(loaded.base_model.model[0], RSTLayer)


def test_truncated_adapter_file_is_refused(folders):
    path = folders / "rst" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    key = sorted(k for k in tensors if k.endswith(".val"))[0]
    tensors[key] = tensors[key][:-1]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"(?i)re-save|corrupt|checksum|crc"):
        PeftModel.from_pretrained(_base(), str(folders / "rst"))
