"""Benchmark recipes end to end: a tiny CLIP built from a config, a tiny generated Office-Home tree, every mode.

Scores are checked against independent computations: zero-shot accuracy by hand from the CLIP's own towers, and the
saved model / RST adapter re-loaded and scored by hand, so the recorded numbers are those of what was saved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from recipes import digits, domainnet, image_clef, office31, office_home, run_uda, visda
from recipes.core import outputs

CLASSES = ["Chair", "Alarm_Clock", "Bike"]  # on disk; label order is alphabetical
DOMAIN_SHIFT = {"Art": 0, "Clipart": 40, "Product": 80, "Real_World": 20}
PROMPT = "an image of a {}"  # office_home.yaml
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------------
# Tiny assets
# ----------------------------------------------------------------------------------------------------------------


def make_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A 1-layer CLIP (hidden 32, 32x32 images) with a byte-level CLIP tokenizer and an image processor."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab_list)}, merges=[], model_max_length=32)
    torch.manual_seed(seed)
    text = dict(
        vocab_size=len(vocab_list),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config={**vision, "patch_size": 8}, projection_dim=16))
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def make_office_home(root: Path, per_class: int = 4, seed: int = 0) -> Path:
    """``root/<domain>/<class>/<i>.png``: 40x40 images, class-dependent colour, domain-dependent shift."""
    rng = np.random.default_rng(seed)
    for domain, shift in DOMAIN_SHIFT.items():
        for c, name in enumerate(CLASSES):
            folder = root / domain / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = rng.integers(0, 90, (40, 40, 3)) + 50 * c + shift
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_small_config(path: Path) -> Path:
    """--config override: 3 classes, 3 tasks, partial set keeps 2 classes (threshold 1), small eval batches."""
    override = {
        "num_classes": len(CLASSES),
        "tasks": ["Ar->Cl", "Cl->Ar", "Pr->Re"],
        "partial": {"num_target_classes": 2, "partial_class_threshold": 1},
        "training_args": {"per_device_eval_batch_size": 6},
    }
    path.write_text(yaml.safe_dump(override))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_assets")
    return {
        "clip": make_tiny_clip(root / "tiny_clip"),
        "data": make_office_home(root / "OfficeHome"),
        "config": write_small_config(root / "small.yaml"),
    }


def argv(assets, out: Path, *flags: str, iterations: int = 2, task=("Ar", "Cl")) -> list[str]:
    base = ["--config", str(assets["config"]), "--data_dir", str(assets["data"]), "--model", str(assets["clip"])]
    base += ["--max_steps", str(iterations), "--eval_steps", "2", "--batch_size", "4", "--learning_rate", "1e-3"]
    base += ["--dataloader_num_workers", "0", "--quiet", "--output_dir", str(out)]
    if task:
        base += ["-s", task[0], "-t", task[1]]
    return base + list(flags)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------------
# Independent reference computations
# ----------------------------------------------------------------------------------------------------------------


def target_set(data: Path, domain: str, keep=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The office_test preset written out: RGB, bilinear resize to 32x32, scale to [0, 1], CLIP normalisation."""
    names = sorted(CLASSES)
    images, labels = [], []
    for label, name in enumerate(names):
        if keep is not None and name not in keep:
            continue
        for file in sorted((data / domain / name).glob("*.png")):
            img = Image.open(file).convert("RGB").resize((32, 32), Image.BILINEAR)
            images.append((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD)
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@torch.no_grad()
def zero_shot_accuracy_by_hand(clip_dir: Path, pixels: torch.Tensor, labels: torch.Tensor) -> float:
    from transformers import AutoTokenizer, CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(clip_dir)
    texts = []
    for name in sorted(CLASSES):
        ids = tokenizer([PROMPT.format(name.replace("_", " ").lower())], return_tensors="pt")
        texts.append(clip.text_projection(clip.text_model(**ids).pooler_output)[0])
    text = torch.nn.functional.normalize(torch.stack(texts), dim=-1)
    image = torch.nn.functional.normalize(clip.visual_projection(clip.vision_model(pixels).pooler_output), dim=-1)
    return scores((image @ text.T).argmax(-1), labels)


@torch.no_grad()
def saved_model_scores(model, pixels: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
    return scores(model.eval()(pixel_values=pixels).logits.argmax(-1), labels)


def scores(predictions: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, float]]:
    """Accuracy and per-class accuracy (classes present), as Python fractions."""
    hits = (predictions == labels).tolist()
    per_class = {}
    for c, name in enumerate(sorted(CLASSES)):
        mine = [h for h, y in zip(hits, labels.tolist()) if y == c]
        if mine:
            per_class[name] = sum(mine) / len(mine)
    return sum(hits) / len(hits), per_class


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------------------------------------------
# Modes
# ----------------------------------------------------------------------------------------------------------------


def test_zero_shot_scores_clip_zero_shot_on_the_target_and_stores_nothing(assets, tmp_path):
    out = tmp_path / "zs"
    results = office_home.main(argv(assets, out, "--zero-shot"))
    entry = results["methods"]["CLIP"]["Ar->Cl"]
    pixels, labels = target_set(assets["data"], "Clipart")
    assert (entry["accuracy"], entry["per_class"]) == zero_shot_accuracy_by_hand(assets["clip"], pixels, labels)
    assert entry["dsp"] == 0 and entry["num_eval"] == len(labels)
    assert read_json(out / "results.json") == results
    assert not any(out.joinpath("Ar-Cl").glob("checkpoint-*")) and not (out / "Ar-Cl" / "model").exists()


@pytest.mark.slow
@pytest.mark.parametrize(("flag", "label"), [("--baseline", "Baseline"), (None, "CMKD")])
def test_full_fine_tuning_saves_the_model_that_scores_the_recorded_accuracy(assets, tmp_path, flag, label):
    from transformers import AutoModel

    out = tmp_path / "run"
    results = office_home.main(argv(assets, out, *([flag] if flag else [])))
    entry = results["methods"][label]["Ar->Cl"]
    saved = AutoModel.from_pretrained(out / "Ar-Cl" / "model")
    pixels, labels = target_set(assets["data"], "Clipart")
    assert (entry["accuracy"], entry["per_class"]) == saved_model_scores(saved, pixels, labels)
    assert entry["dsp"] == sum(p.numel() for p in saved.parameters())  # full fine-tuning stores every parameter
    assert entry["nbytes"] == (out / "Ar-Cl" / "model" / "model.safetensors").stat().st_size
    assert read_json(out / "Ar-Cl" / outputs.TASK_RESULT_FILENAME)["method"] == label
    assert not any((out / "Ar-Cl").glob("checkpoint-*"))  # scratch checkpoints are dropped once the model is saved


def test_a_full_model_is_pushed_by_trainer_push_to_hub_with_the_saved_card(assets, tmp_path, monkeypatch):
    """Anything but an RST adapter goes through the Trainer's own push: repo created, the saved folder uploaded with
    the recipe's card (selection rule, accuracy), not the Trainer's generic summary, and no checkpoints."""
    import transformers.trainer
    from huggingface_hub import constants

    calls = []

    class FakeHub:  # transformers.trainer talks to the Hub through hf_api() only
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create", repo_id, kwargs["token"]))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns, token, **kwargs):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            calls.append(("upload", repo_id, folder_path, files, ignore_patterns, token))
            card = (Path(folder_path) / "README.md").read_text()
            calls.append(("card", card))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(transformers.trainer, "hf_api", FakeHub)
    out = tmp_path / "run"
    results = office_home.main(argv(assets, out, "--push_to_hub", "--hub_token", "hf_test", "--hub_model_id", "me/m"))
    model_dir = out / "Ar-Cl" / "model"
    assert calls[0] == ("create", "me/m", "hf_test")
    _, repo, folder, files, ignored, token = calls[1]
    assert (repo, folder, token) == ("me/m", str(model_dir), "hf_test") and "checkpoint-*" in ignored
    assert {"model.safetensors", "config.json", "README.md", "preprocessor_config.json", "training_args.bin"} <= set(
        files
    )
    card = calls[2][1]
    assert "checkpoint: zs_agreement" in card or "Checkpoint selection:" in card
    assert card == (model_dir / "README.md").read_text() and "CMKD-adapted CLIP" in card
    assert results["methods"]["CMKD"]["Ar->Cl"]["hub_repo"] == "me/m"


@pytest.mark.slow
def test_fixmatch_trains_on_strong_target_views(assets, tmp_path):
    out = tmp_path / "fm"
    results = office_home.main(argv(assets, out, "--fixmatch", "--keep_checkpoints", "--logging_steps", "1"))
    assert list(results["methods"]) == ["CMKD+FixMatch"]
    state = read_json(out / "Ar-Cl" / "checkpoint-2" / "trainer_state.json")
    logged = [h for h in state["log_history"] if "loss" in h]
    assert len(logged) == 2 and all("fixmatch_student" in h and "fixmatch_teacher" in h for h in logged)


@pytest.mark.slow
def test_partial_set_evaluates_on_the_first_classes_in_alphabetical_order(assets, tmp_path):
    out = tmp_path / "partial"
    results = office_home.main(argv(assets, out, "--partial", "--keep_checkpoints", "--logging_steps", "1"))
    entry = results["methods"]["CMKD"]["Ar->Cl"]
    kept = sorted(CLASSES)[:2]
    pixels, labels = target_set(assets["data"], "Clipart", keep=kept)
    assert entry["num_eval"] == len(labels) and set(entry["per_class"]) == set(kept)
    from transformers import AutoModel

    saved = AutoModel.from_pretrained(out / "Ar-Cl" / "model")
    assert (entry["accuracy"], entry["per_class"]) == saved_model_scores(saved, pixels, labels)


def make_digits(root: Path, per_class: int = 2, seed: int = 0) -> Path:
    """torchvision's on-disk formats: MNIST idx files (28x28) under MNIST/raw, USPS LIBSVM .bz2 files (16x16); the
    test splits hold one more image per class than the training splits."""
    import bz2
    import struct

    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "t10k"):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class + (1 if split == "t10k" else 0))
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            struct.pack(">iiii", 0x803, len(labels), 28, 28) + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">ii", 0x801, len(labels)) + labels.tobytes())
    for name in ("usps.bz2", "usps.t.bz2"):
        lines = []
        for label in np.repeat(np.arange(10), per_class + (1 if name == "usps.t.bz2" else 0)):
            values = rng.uniform(-1, 1, 256)
            lines.append(f"{label + 1} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in enumerate(values)))
        with bz2.open(root / name, "wt") as fh:
            fh.write("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_digits_trains_on_training_sets_and_scores_the_target_test_set(assets, tmp_path):
    """U->M: USPS (its own source augmentation) -> MNIST; the recorded score is the saved model on MNIST's test set."""
    from torchvision.datasets import MNIST, USPS
    from transformers import AutoModel

    data = make_digits(tmp_path / "digits")
    out = tmp_path / "u_m"
    flags = ["--data_dir", str(data), "--model", str(assets["clip"]), "--max_steps", "2", "--eval_steps", "2"]
    flags += ["--batch_size", "4", "--learning_rate", "1e-3", "--dataloader_num_workers", "0", "--quiet", "--baseline"]
    results = digits.main([*flags, "-s", "usps", "-t", "mnist", "--output_dir", str(out)])
    entry = results["methods"]["Baseline"]["U->M"]

    test = MNIST(str(data), train=False)
    pixels = []
    for i in range(len(test)):
        img = test[i][0].convert("RGB").resize((32, 32), Image.BILINEAR)  # digits_test: RGB, Resize(32)
        pixels.append((np.asarray(img, dtype=np.float32) / 255.0 - MEAN) / STD)
    pixels = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(test.targets)
    saved = AutoModel.from_pretrained(out / "U-M" / "model")
    predictions = saved.eval()(pixel_values=pixels).logits.argmax(-1)
    assert entry["accuracy"] == sum((predictions == labels).tolist()) / len(labels)
    task = read_json(out / "U-M" / outputs.TASK_RESULT_FILENAME)
    assert (task["num_source"], task["num_target"], task["num_eval"]) == (len(USPS(str(data))), 20, 30)


# ----------------------------------------------------------------------------------------------------------------
# --all with RST: adapters, model cards, results JSON, table, plot, push
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_all_tasks_with_rst_write_adapters_cards_results_table_and_plot(assets, tmp_path, monkeypatch):
    from huggingface_hub import constants
    from peft import PeftModel
    from transformers import CLIPModel

    import peft_rst
    from cmkd import CLIPAdaptationModel

    pushed = []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the push is mocked; offline, --push_to_hub is refused
    monkeypatch.setattr(peft_rst, "push_adapter_to_hub", lambda folder, repo, **kw: pushed.append((folder, repo, kw)))
    out = tmp_path / "all"
    flags = ["--all", "--rst", "--tau", "1e-3", "--push_to_hub", "--hub_token", "hf_test", "--hub_model_id", "me/oh"]
    results = office_home.main(argv(assets, out, *flags, task=None))

    tasks = ["Ar->Cl", "Cl->Ar", "Pr->Re"]
    assert read_json(out / "results.json") == results and results["tasks"] == tasks
    rows = results["methods"]["CMKD+RST"]
    clip = CLIPModel.from_pretrained(assets["clip"])
    domains = {"Ar": "Art", "Cl": "Clipart", "Pr": "Product", "Re": "Real_World"}
    for task in tasks:
        src, tgt = task.split("->")
        adapter = out / f"{src}-{tgt}" / "adapter"
        base = CLIPAdaptationModel.from_clip(assets["clip"], sorted(CLASSES), PROMPT)
        model = PeftModel.from_pretrained(base, adapter)
        pixels, labels = target_set(assets["data"], domains[tgt])
        assert (rows[task]["accuracy"], rows[task]["per_class"]) == saved_model_scores(model, pixels, labels)
        # DSP by hand: backbone entries that differ from the pretrained CLIP + every tensor of the head
        merged = model.merge_and_unload()
        changed = sum(
            int((merged.state_dict()[k] != v).sum())
            for k, v in clip.state_dict().items()
            if k.startswith(("vision_model.", "visual_projection."))
        )
        assert changed > 0
        assert rows[task]["dsp"] == changed + sum(t.numel() for t in merged.head.state_dict().values())
        files = ("adapter_config.json", "adapter_model.safetensors")
        assert rows[task]["nbytes"] == sum((adapter / f).stat().st_size for f in files)
        card = (adapter / "README.md").read_text()
        assert f"{domains[src]} → {domains[tgt]}" in card and f"{100 * rows[task]['accuracy']:.2f} %" in card
    assert [repo for _, repo, _ in pushed] == ["me/oh-ar-cl", "me/oh-cl-ar", "me/oh-pr-re"]
    assert all(kw["token"] == "hf_test" and kw["card_data"]["dataset"] == "office_home" for _, _, kw in pushed)
    assert [rows[t]["hub_repo"] for t in tasks] == ["me/oh-ar-cl", "me/oh-cl-ar", "me/oh-pr-re"]

    table = (out / "results.md").read_text()
    assert "| Method | Ar→Cl | Cl→Ar | Pr→Re | Avg. | DSP(M) |" in table
    cells = [f"{100 * rows[t]['accuracy']:.1f}" for t in tasks]
    avg = sum(100 * rows[t]["accuracy"] for t in tasks) / 3
    dsp_m = sum(rows[t]["dsp"] for t in tasks) / 1e6
    assert f"| CMKD+RST | {' | '.join(cells)} | {avg:.1f} | {dsp_m:.2f} |" in table
    assert (out / "accuracy_vs_dsp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------------------
# Every recipe: --help with the YAML's defaults
# ----------------------------------------------------------------------------------------------------------------

RECIPES = {
    "office_home": office_home,
    "office31": office31,
    "visda": visda,
    "domainnet": domainnet,
    "image_clef": image_clef,
    "digits": digits,
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_help_shows_its_yaml_defaults(name, capsys):
    with pytest.raises(SystemExit) as exc:
        RECIPES[name].main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    raw = yaml.safe_load((REPO / "cmkd" / "presets" / f"{name}.yaml").read_text())
    backbone = raw["backbones"][raw["backbone"]]

    options = text[text.index("options:") :]

    def shown(flag: str) -> str:  # the "(default: ...)" of this flag's own help, not of a later flag
        pattern = rf" {flag} [A-Z_]+(?:, --[a-z-]+ [A-Z_]+)? (?:(?! --).)*?\(default: ([^)]+)\)"
        return re.search(pattern, options).group(1)

    assert float(shown("--tau")) == backbone["tau"]
    assert float(shown("--learning_rate")) == backbone["learning_rate"]
    assert shown("--model") == backbone["model"]
    assert int(shown("--max_steps")) == raw["training_args"]["max_steps"]
    assert int(shown("--batch_size")) == raw["batch_size"]
    assert int(shown("--eval_steps")) == raw["training_args"]["eval_steps"]
    assert int(shown("--seed")) == raw["training_args"]["seed"]
    assert "--resume_from_checkpoint" in text and "--push_to_hub" in text


# ----------------------------------------------------------------------------------------------------------------
# Bad input: a clear message, nothing written
# ----------------------------------------------------------------------------------------------------------------


def test_partial_on_a_benchmark_without_the_protocol_is_refused(tmp_path, capsys):
    out = tmp_path / "o31"
    with pytest.raises(SystemExit) as exc:
        office31.main(["--data_dir", str(tmp_path), "-s", "A", "-t", "W", "--partial", "--output_dir", str(out)])
    assert exc.value.code == 2
    assert "Office-31 has no partial-set protocol" in capsys.readouterr().err
    assert not out.exists()


def test_push_without_a_token_is_refused_before_anything_runs(assets, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "push"
    with pytest.raises(SystemExit) as exc:
        office_home.main(argv(assets, out, "--rst", "--push_to_hub"))
    assert exc.value.code == 2 and "needs a Hub token" in capsys.readouterr().err
    assert not out.exists()


def test_resume_flag_conflicts_are_refused(assets, tmp_path, capsys):
    for flags, message in [
        (["--resume_from_checkpoint", "--overwrite"], "pass only one of them"),
        (["--zero-shot", "--resume_from_checkpoint"], "no checkpoint to --resume_from_checkpoint"),
        (["--resume_from_checkpoint", str(tmp_path / "nowhere")], "is not a checkpoint folder"),
    ]:
        with pytest.raises(SystemExit) as exc:
            office_home.main(argv(assets, tmp_path / "x", *flags))
        assert exc.value.code == 2 and message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        office_home.main(argv(assets, tmp_path / "x", "--all", "--resume_from_checkpoint", str(tmp_path), task=None))
    assert "with --all pass the flag without a value" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_finished_output_folder_is_refused_unless_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "done"
    first = office_home.main(argv(assets, out, "--zero-shot"))
    stamp = (out / "results.json").stat().st_mtime_ns
    with pytest.raises(SystemExit) as exc:
        office_home.main(argv(assets, out, "--zero-shot"))
    assert exc.value.code == 2 and "already holds a finished run" in capsys.readouterr().err
    assert (out / "results.json").stat().st_mtime_ns == stamp
    again = office_home.main(argv(assets, out, "--zero-shot", "--overwrite"))
    assert again["methods"] == first["methods"]


def test_missing_data_and_models_are_one_line_errors(assets, tmp_path):
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(office_home.main, argv(assets, tmp_path / "a", "--data_dir", str(tmp_path / "nothing")))
    assert str(exc.value.code).startswith("error: --data_dir") and "does not exist" in str(exc.value.code)
    with pytest.raises(SystemExit) as exc:
        run_uda.run_recipe(office_home.main, argv(assets, tmp_path / "b", "--model", str(tmp_path)))
    assert str(exc.value.code).startswith("error: cannot load CLIP")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------------------
# accelerate launch
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_trains_like_one_process(assets, tmp_path):
    """`accelerate launch recipes/office_home.py ...`: 2 processes x batch 2 give the losses of 1 process x batch 4.

    Without MPI, accelerate starts several CPU processes through its torchrun launcher (--multi_gpu); the runner's
    arguments put them on gloo.
    """
    import os
    import socket
    import subprocess
    import sys

    flags = ["--keep_checkpoints", "--logging_steps", "1", "--baseline"]
    office_home.main(argv(assets, tmp_path / "one", *flags))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), str(REPO / "recipes" / "office_home.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launch, *argv(assets, tmp_path / "two", *flags)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("[Ar->Cl] Baseline") == 1  # one process reports
    logs = []
    for run in ("one", "two"):
        state = read_json(tmp_path / run / "Ar-Cl" / "checkpoint-2" / "trainer_state.json")
        logs.append([h["loss"] for h in state["log_history"] if "loss" in h])
    assert len(logs[0]) == 2
    np.testing.assert_allclose(logs[1], logs[0], rtol=1e-5)
    assert read_json(tmp_path / "two" / "results.json")["methods"]["Baseline"]["Ar->Cl"]["num_eval"] == 12
