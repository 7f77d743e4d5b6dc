"""``--peft``: every method of the paper's Table VII through the same CMKD trainer, one row each, one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_recipes_config import make_layout  # same folder
from test_run_uda import argv, make_office_home, make_tiny_clip, write_small_config  # same folder

from cmkd.benchmarks import ConfigError
from recipes import office_home, run_uda
from recipes.core.arguments import parse


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


def _resolve(flags: list[str]):
    return parse(
        ["-s", "Ar", "-t", "Cl", "--data_dir", str(make_layout(Path("data"))), *flags],
        "office_home",
        exit_on_error=False,
    )[0]


def test_peft_flag_parsing_and_labels(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = _resolve(["--peft", "rst, lora,adalora", "--selection", "last"])
    assert run.peft_methods == ("rst", "lora", "adalora") and run.tau == 1e-6  # RST among them: the preset's tau
    assert run.output_dir == Path("runs/office_home/cmkd_peft/Ar-Cl")
    assert _resolve(["--rst"]).peft_methods == ("rst",) and _resolve(["--peft", "rst"]).method_label == "CMKD+RST"
    lora = _resolve(["--peft", "lora"])
    assert (lora.peft, lora.method_label, lora.tau) == ("lora", "CMKD+LoRA", None)
    assert lora.output_dir == Path("runs/office_home/cmkd_lora/Ar-Cl")
    assert _resolve([]).peft_methods == ("full",) and _resolve([]).method_label == "CMKD"
    assert _resolve(["--peft", "linear_probe", "--baseline"]).method_label == "Baseline+Linear probe"
    for flags, message in [
        (["--peft", "lora,prompt"], "unknown method\\(s\\) \\['prompt'\\]; choose from rst, lora"),
        (["--rst", "--peft", "lora"], "--rst is --peft rst"),
        (["--peft", "rst,adalora"], "--peft adalora needs --selection last"),
        (["--peft", "lora", "--tau", "1e-3"], "--tau is the RST threshold"),
        (["--peft", "bitfit", "--zero-shot"], "--zero-shot trains nothing"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _resolve(flags)


def test_several_methods_run_through_one_trainer_and_end_in_one_table(assets, tmp_path, capsys):
    out = tmp_path / "table"
    results = run_uda.run_recipe(office_home.main, argv(assets, out, "--peft", "lora,bitfit,linear_probe"))
    printed = capsys.readouterr().out
    assert "method 1 of 3: CMKD+LoRA" in printed and "method 3 of 3: CMKD+Linear probe" in printed
    labels = ["CMKD+LoRA", "CMKD+BitFit", "CMKD+Linear probe"]
    assert list(results["methods"]) == labels
    assert json.loads((out / "results.json").read_text()) == results
    table = (out / "results.md").read_text()
    assert all(label in table for label in labels) and (out / "accuracy_vs_dsp.png").is_file()

    # DSP from the saved files, counted by hand: the head, plus every bias (BitFit) or the LoRA A/B matrices
    probe = load_file(out / "linear_probe" / "Ar-Cl" / "model" / "model.safetensors")
    head = sum(t.numel() for k, t in probe.items() if k.startswith("head."))
    assert results["methods"]["CMKD+Linear probe"]["Ar->Cl"]["dsp"] == head
    bitfit = load_file(out / "bitfit" / "Ar-Cl" / "model" / "model.safetensors")
    biases = sum(t.numel() for k, t in bitfit.items() if k.endswith(".bias") and not k.startswith("head."))
    assert results["methods"]["CMKD+BitFit"]["Ar->Cl"]["dsp"] == biases + head
    lora = load_file(out / "lora" / "Ar-Cl" / "adapter" / "adapter_model.safetensors")
    ab = sum(t.numel() for k, t in lora.items() if "lora_A" in k or "lora_B" in k)
    assert ab > 0 and results["methods"]["CMKD+LoRA"]["Ar->Cl"]["dsp"] == ab + head
    # linear probe trains the head only: the saved vision tower is the pretrained one, BitFit's differs in biases only
    import torch
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(assets["clip"]).state_dict()
    for saved, changed in ((probe, set()), (bitfit, {"bias"})):
        tower = {k: v for k, v in saved.items() if "vision_model.encoder." in k}
        assert tower
        for key, value in tower.items():
            same = torch.equal(value, clip["vision_model." + key.split("vision_model.", 1)[1]])
            assert same or key.rpartition(".")[2] in changed, key


def test_run_uda_is_the_benchmark_recipes_with_benchmark_chosen_by_flag(assets, tmp_path, capsys):
    from recipes import run_uda

    with pytest.raises(SystemExit) as exc:
        run_uda.main(["--benchmark", "visda", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "--benchmark" in text and "--peft" in text
    assert "(default: 20000)" in text  # visda.yaml's max_steps, not another preset's
    with pytest.raises(SystemExit) as exc:
        run_uda.main(["--all"])
    assert exc.value.code == 2 and "--benchmark is required" in capsys.readouterr().err
    ours = run_uda.main(["--benchmark", "office_home", *argv(assets, tmp_path / "a", "--zero-shot")])
    alias = office_home.main(argv(assets, tmp_path / "b", "--zero-shot"))
    strip = {k: v for k, v in ours["methods"]["CLIP"]["Ar->Cl"].items() if k != "path"}
    assert strip == {k: v for k, v in alias["methods"]["CLIP"]["Ar->Cl"].items() if k != "path"}
