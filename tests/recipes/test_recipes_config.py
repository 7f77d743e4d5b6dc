"""The shared recipe CLI: a preset's values as defaults, flags and --config over them, usage errors naming the fix."""

import json
import re
from pathlib import Path

import pytest

from cmkd.benchmarks import ConfigError, available_benchmarks, load_benchmark_config
from recipes.core.arguments import parse
from recipes.core.tables import RESULTS_FILENAME

# ------------------------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------------------------


def _resolve(benchmark, argv):
    return parse(argv, benchmark, exit_on_error=False)[0]


def make_layout(root: Path) -> Path:
    """Every preset's domain folders under ``root``: the arguments check that the data exists (not its contents)."""
    for name in available_benchmarks():
        for spec in load_benchmark_config(name).domains.values():
            (root / spec.folder).mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture
def base(tmp_path):
    return ["--data_dir", str(make_layout(tmp_path)), "--output_dir", str(tmp_path / "out")]


def test_defaults_come_from_yaml_and_flags_override(base):
    run = _resolve("office_home", ["-s", "art", "-t", "Cl", *base])
    assert run.tasks == [("Ar", "Cl")] and run.method == "cmkd" and run.method_label == "CMKD"
    args = run.training
    assert args.learning_rate == 3e-6 and args.head_lr_multiplier == 1000 and run.tau is None
    assert args.max_steps == 10000 and run.recipe.batch_size == 32 and args.seed == 42 and args.eval_steps == 500
    assert args.save_steps == 500 and args.sgd_momentum == 0.9 and run.cmkd.lambda1 == 0.25
    run = _resolve(
        "office_home",
        [
            "-s",
            "Ar",
            "-t",
            "Rw",
            "--rst",
            "--fixmatch",
            "--learning_rate",
            "1e-5",
            "--max_steps",
            "7",
            "--seed",
            "0",
            *base,
        ],
    )
    assert run.tasks == [("Ar", "Re")] and run.tau == 1e-6 and run.training.learning_rate == 1e-5
    assert run.training.max_steps == 7 and run.training.seed == 0 and run.method_label == "CMKD+FixMatch+RST"
    run = _resolve("visda", ["-s", "Syn", "-t", "Real", "--rst", "--tau", "3e-7", *base])
    assert run.tau == 3e-7 and run.training.learning_rate == 3e-7


def test_all_runs_every_task(base):
    run = _resolve("office_home", ["--all", *base])
    assert len(run.tasks) == 12 and run.task_names[0] == "Ar->Cl"


def test_backbone_without_transformers_checkpoint_needs_model(base):
    with pytest.raises(ConfigError, match="pass --model"):
        _resolve("office_home", ["--all", "--backbone", "rn50", *base])
    run = _resolve("office_home", ["--all", "--backbone", "rn50", "--model", "/ckpt/rn50", "--rst", *base])
    args = run.training
    assert (run.model, args.learning_rate, args.head_lr_multiplier, run.tau) == ("/ckpt/rn50", 3e-7, 10000, 1e-5)
    with pytest.raises(ConfigError, match="choose from \\['vit_b16', 'rn50'\\]"):
        _resolve("office_home", ["--all", "--backbone", "vit_l14", *base])


@pytest.mark.parametrize(
    "benchmark, argv, message",
    [
        ("office31", ["--all", "--partial"], "no partial-set protocol.*office_home"),
        ("office_home", ["--all", "--baseline", "--zero-shot"], "pass only one"),
        ("office_home", ["--all", "--fixmatch", "--baseline"], "--fixmatch extends CMKD"),
        ("office_home", ["--all", "--fixmatch", "--zero_shot"], "--fixmatch extends CMKD"),
        ("office_home", ["--all", "--rst", "--zero-shot"], "trains nothing"),
        ("office_home", ["--all", "--tau", "1e-6"], "add --rst"),
        ("office_home", ["--all", "-s", "Ar"], "drop --source"),
        ("office_home", ["-s", "Ar"], "give --source and --target"),
        ("office_home", ["-s", "Ar", "-t", "Kitchen"], "valid domains: Ar \\(Art\\), Cl \\(Clipart\\)"),
        ("office_home", ["-s", "Art", "-t", "ar"], "same domain"),
        ("office_home", ["--all", "--learning_rate", "-1"], "learning_rate must be a finite number > 0, got -1.0"),
        ("office_home", ["--all", "--learning_rate", "nan"], "learning_rate must be a finite number > 0, got nan"),
        ("office_home", ["--all", "--learning_rate", "inf"], "learning_rate must be a finite number > 0, got inf"),
        ("office_home", ["--all", "--rst", "--tau", "0"], "--tau must be a finite number > 0"),
        ("office_home", ["--all", "--rst", "--tau", "nan"], "--tau must be a finite number > 0, got nan"),
        ("office_home", ["--all", "--dataloader_num_workers", "-2"], "dataloader_num_workers must be an integer >= 0"),
        ("office_home", ["--all", "--seed", "-1"], "seed must be an integer in \\[0, 4.29497e\\+09\\], got -1"),
        ("office_home", ["--all", "--seed", str(2**32)], "seed must be an integer in"),
        ("office_home", ["--all", "--max_steps", "0"], "max_steps must be an integer >= 1, got 0"),
        ("office_home", ["--all", "--eval_steps", "0"], "eval_steps must be an integer >= 1"),
        ("office_home", ["--all", "--batch_size", "0"], "--batch_size must be an integer >= 1"),
        ("office_home", ["--all", "--download"], "--download only applies"),
        ("office_home", ["--all", "--dataset_id", "u/oh", "--image_list_dir", "x"], "drop --image_list_dir"),
        ("office_home", ["--all", "--domain_column", "domain"], "only apply with --dataset_id"),
        ("office_home", ["--all", "--image_list", "Ar"], "DOMAIN=FILE"),
        ("office_home", ["--all", "--push_to_hub", "--zero-shot"], "nothing to --push_to_hub"),
        ("digits", ["--all", "--image_list_dir", "x"], "torchvision loaders"),
    ],
)
def test_invalid_combinations(base, benchmark, argv, message):
    with pytest.raises(ConfigError, match=message):
        _resolve(benchmark, [*argv, *base])


def test_missing_data_and_output(tmp_path):
    with pytest.raises(ConfigError, match="no data given"):
        _resolve("office_home", ["--all", "--output_dir", str(tmp_path)])


def test_output_dir_defaults_to_runs_benchmark_method_task(tmp_path, monkeypatch):
    """The README's `accelerate launch recipes/office_home.py ... --rst` lines have no --output_dir."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the suite runs offline
    data = ["--data_dir", str(make_layout(tmp_path))]
    one = _resolve("office_home", ["--source", "Art", "--target", "Clipart", "--rst", *data])
    assert one.output_dir == Path("runs/office_home/cmkd_rst/Ar-Cl")
    every = _resolve("office_home", ["--all", "--rst", *data])
    assert every.output_dir == Path("runs/office_home/cmkd_rst/all")
    assert _resolve("office_home", ["--all", "--baseline", *data]).output_dir == Path("runs/office_home/baseline/all")
    fm = _resolve("office_home", ["-s", "Pr", "-t", "Re", "--fixmatch", "--partial", *data])
    assert fm.output_dir == Path("runs/office_home/cmkd_fixmatch_partial/Pr-Re")
    zs = _resolve("office_home", ["-s", "Pr", "-t", "Re", "--zero-shot", *data])
    assert zs.output_dir == Path("runs/office_home/clip/Pr-Re")
    # the default folder's name alone ("Ar-Cl", "all") would be a poor Hub repo name
    pushed = _resolve("office_home", ["-s", "Ar", "-t", "Cl", "--rst", "--push_to_hub", "--hub_token", "x", *data])
    assert pushed.hub_model_id == "office_home-cmkd_rst-ar-cl"
    assert _resolve("office_home", ["--all", "--output_dir", "mine", *data]).output_dir == Path("mine")
    with pytest.raises(ConfigError, match="--output_dir is empty"):
        _resolve("office_home", ["--all", "--output_dir", "", *data])
    # a finished default folder is refused like any other
    (tmp_path / "runs/office_home/cmkd_rst/all").mkdir(parents=True)
    (tmp_path / "runs/office_home/cmkd_rst/all" / RESULTS_FILENAME).write_text("{}")
    with pytest.raises(ConfigError, match="already holds a finished run"):
        _resolve("office_home", ["--all", "--rst", *data])


def test_help_documents_the_default_output_dir_and_the_presets_defaults(capsys):
    with pytest.raises(SystemExit):
        parse(["--help"], "office_home")
    text = " ".join(capsys.readouterr().out.split())
    assert "default: runs/<benchmark>/<method>/<SRC>-<TGT>, or runs/<benchmark>/<method>/all with --all" in text
    assert "--max_steps MAX_STEPS" in text and "(default: 10000)" in text and "--lambda1 LAMBDA1" in text


def test_help_without_a_benchmark_lists_the_presets_and_the_recipe_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0 and "presets: digits, digits_shift, domainnet" in text
    assert "--benchmark BENCHMARK" in text and "--source SOURCE" in text and "--target TARGET" in text


def test_finished_output_dir_is_refused_unless_overwrite(tmp_path, base):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.bin").write_bytes(b"x")  # an unfinished run may be continued
    assert _resolve("office_home", ["--all", *base]).output_dir == out
    (out / RESULTS_FILENAME).write_text(json.dumps({"tasks": [], "methods": {}}))
    with pytest.raises(ConfigError, match="already holds a finished run.*--overwrite"):
        _resolve("office_home", ["--all", *base])
    assert _resolve("office_home", ["--all", "--overwrite", *base]).recipe.overwrite
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        _resolve("office_home", ["--all", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "file")])


def test_push_to_hub_needs_a_token(monkeypatch, base):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # the suite runs offline
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(ConfigError, match="needs a Hub token: set HF_TOKEN"):
        _resolve("office_home", ["--all", "--push_to_hub", *base])
    run = _resolve("office_home", ["--all", "--push_to_hub", "--hub_token", "hf_explicit", *base])
    assert run.training.hub_token == "hf_explicit" and "hf_explicit" not in json.dumps(run.to_dict())
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_from_env")
    assert _resolve("office_home", ["--all", "--push_to_hub", *base]).training.push_to_hub


def test_parse_turns_config_errors_into_usage_errors(capsys, base):
    with pytest.raises(SystemExit) as exc:
        parse(["--all", "--partial", *base], "office31")
    assert exc.value.code == 2
    assert "no partial-set protocol" in capsys.readouterr().err


def test_every_flag_is_a_typed_field_of_one_dataclass(base, tmp_path):
    flags = ["--selection", "last", "--source_val_fraction", "0.25", "--report_to", "tensorboard", "--quiet"]
    (tmp_path / "flat").mkdir()
    run = _resolve("office_home", ["-s", "Ar", "--target_dir", str(tmp_path / "flat"), *flags, *base])
    assert (run.recipe.selection, run.data.source_val_fraction, run.training.report_to) == (
        "last",
        0.25,
        ["tensorboard"],
    )
    assert run.recipe.quiet and run.data.target_dir == str(tmp_path / "flat") and run.tasks == [("Ar", "flat")]
    default = _resolve("office_home", ["--all", *base])
    assert (default.recipe.selection, default.training.report_to, default.training.resume_from_checkpoint) == (
        None,
        [],
        None,
    )
    bare = _resolve("office_home", ["--all", "--resume_from_checkpoint", *base])
    assert bare.training.resume_from_checkpoint == "last"


def test_config_override_yaml(tmp_path, base):
    override = tmp_path / "over.yaml"
    override.write_text("training_args:\n  max_steps: 123\ncmkd_config:\n  lambda1: 0.5\n")
    run = _resolve("office_home", ["--all", "--config", str(override), *base])
    cc = run.bench.cmkd_config
    assert run.training.max_steps == 123 and cc["lambda1"] == 0.5 and cc["lambda3"] == 0.025
    assert run.cmkd.lambda1 == 0.5 and run.cmkd.lambda3 == 0.025  # the preset's name is CMKDConfig's
    assert _resolve("office_home", ["--all", "--lambda1", "0.7", *base]).cmkd.lambda1 == 0.7  # and the flag's
    override.write_text("training_args:\n  iters: 1\n")
    with pytest.raises(ConfigError, match="\\['iters'\\] are not cmkd.CMKDTrainingArguments fields"):
        _resolve("office_home", ["--all", "--config", str(override), *base])
    with pytest.raises(ConfigError, match="does not exist"):
        _resolve("office_home", ["--all", "--config", str(tmp_path / "nope.yaml"), *base])


# ------------------------------------------------------------------------------------------------------------------
# Broken YAML: one-line errors naming the file and the key, never a traceback from deeper code
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("training_args:\n  max_steps: 10\n bad indent: [\n", "over.yaml is not valid YAML at line 3"),
        ("training_args: {max_steps: [1, 2}\n", "over.yaml is not valid YAML at line 1"),
        (
            "training_args:\n  max_steps: ten\n",
            "over.yaml \\(over office_home.yaml\\).training_args.max_steps must be an integer, got 'ten'",
        ),
        ("batch_size: '32'\n", "batch_size must be an integer, got '32'"),
        ("training_args:\n  seed: 1.5\n", "training_args.seed must be an integer, got 1.5"),
        ("training_args:\n  sgd_nesterov: 'false'\n", "training_args.sgd_nesterov must be true or false, got 'false'"),
        ("cmkd_config:\n  lambda1: high\n", "cmkd_config.lambda1 must be a number, got 'high'"),
        ("cmkd_config:\n  lambda1: -1\n", "cmkd_config: CMKDConfig.lambda1 must be in"),
        ("prompt_template: 5\n", "prompt_template must be a string, got 5"),
        ("training_args:\n  max_steps: 0\n", "training_args: max_steps must be an integer >= 1, got 0"),
        (
            "training_args:\n  sgd_momentum: .nan\n",
            "training_args: sgd_momentum must be a finite number in \\[0, 1\\], got nan",
        ),
        (
            "backbones:\n  vit_b16:\n    learning_rate: -3\n",
            "backbones.vit_b16.learning_rate must be a finite number > 0",
        ),
        ("training_args: 5\n", "training_args must be a mapping, got 5"),
        ("tasks: Ar->Cl\n", "tasks must be a non-empty list"),
        ("domains: [Ar, Cl]\n", "domains must be a mapping, got \\['Ar', 'Cl'\\]"),
        ("domains:\n  Ar: Art\n", "domains.Ar must be a mapping"),
        ("classes: 5\n", "classes must be a list"),
        ("table_layout: grid\n", "table_layout must be one of \\['tasks', 'per_class', 'matrix'\\], got 'grid'"),
        ("num_classes: '65'\n", "num_classes must be an integer, got '65'"),
        ("- a\n- b\n", "--config file .*over.yaml must hold a YAML mapping, got list"),
    ],
)
def test_broken_yaml_is_a_one_line_error_naming_file_and_key(tmp_path, base, capsys, text, message):
    override = tmp_path / "over.yaml"
    override.write_text(text)
    with pytest.raises(SystemExit) as exc:  # the recipes' parser: a usage error (exit status 2), before any loading
        parse(["--all", "--config", str(override), *base], "office_home")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and re.search(message, err), err
    assert len(err.strip().splitlines()[-1]) > 20 and "Traceback" not in err


def test_yaml_in_another_encoding_names_the_file(tmp_path, base):
    override = tmp_path / "over.yaml"
    override.write_bytes("prompt_template: 'une photo d\u00e9 {}'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="over.yaml is not UTF-8 text \\(byte 0xe9"):
        _resolve("office_home", ["--all", "--config", str(override), *base])


def test_config_that_is_a_folder_is_named(tmp_path, base):
    with pytest.raises(ConfigError, match="--config file .* is a folder; pass the YAML file"):
        _resolve("office_home", ["--all", "--config", str(tmp_path), *base])


def test_partial_sets_the_protocols_loss_weights_and_partial_false_does_not(base):
    """--partial puts the preset's partial-set CMKDConfig fields over cmkd_config; flags still override them."""
    partial = _resolve("office_home", ["--all", "--partial", *base])
    assert (partial.cmkd.cls_weight, partial.cmkd.transfer_weight, partial.cmkd.partial_class_threshold) == (
        0.5,
        0.1,
        14,
    )
    for flags in ([], ["--partial", "false"]):
        plain = _resolve("office_home", ["--all", *flags, *base])
        assert not plain.recipe.partial and (plain.cmkd.cls_weight, plain.cmkd.transfer_weight) == (1.0, 1.0)
    assert _resolve("office_home", ["--all", "--partial", "--cls_weight", "0.7", *base]).cmkd.cls_weight == 0.7
