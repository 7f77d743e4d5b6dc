"""cmkd.benchmarks: the shipped presets' values (checked by hand against the paper and release) and the errors."""

import itertools

import pytest
import yaml

from cmkd import benchmarks
from cmkd.benchmarks import ConfigError, available_benchmarks, load_benchmark_config

# ------------------------------------------------------------------------------------------------------------------
# YAML values, typed from shared/reference/official-implementation.md and the paper (not read from the code)
# ------------------------------------------------------------------------------------------------------------------


def test_all_six_benchmarks_ship():
    assert available_benchmarks() == [
        "digits",
        "digits_shift",  # the demo's toy task
        "domainnet",
        "image_clef",
        "office31",
        "office_home",
        "visda",
    ]


def test_office_home_values():
    cfg = load_benchmark_config("office_home")
    vit = cfg.backbones["vit_b16"]
    assert cfg.backbone == "vit_b16" and vit.model == "openai/clip-vit-base-patch16"
    assert (vit.learning_rate, vit.head_lr_multiplier, vit.tau) == (3e-6, 1000, 1e-6)
    rn = cfg.backbones["rn50"]
    assert (rn.learning_rate, rn.head_lr_multiplier, rn.tau) == (3e-7, 10000, 1e-5)
    ta, cc = cfg.training_args, cfg.cmkd_config
    assert ta["max_steps"] == 10000 and cfg.batch_size == 32 and ta["seed"] == 42
    assert (cc["lambda1"], cc["lambda2"], cc["lambda3"]) == (0.25, 0.1, 0.025)
    assert cc["label_smoothing"] == 0.1 and cc["gamma"] == 1.0 and cc["warmup_max_iter"] == 10000
    assert cfg.prompt_template == "an image of a {}"
    assert (cc["fixmatch_threshold"], cc["fixmatch_factor"]) == (0.95, 0.5)
    assert (ta["sgd_momentum"], ta["sgd_nesterov"], ta["weight_decay"]) == (0.9, True, 5e-4)
    assert (ta["lr_decay_gamma"], ta["lr_decay_power"]) == (0.0003, 0.75)
    assert cfg.num_classes == 65 and cfg.metric == "accuracy"
    assert (cfg.augmentation.train, cfg.augmentation.test, cfg.augmentation.image_size) == (
        "office_train",
        "office_test",
        224,
    )
    p = cfg.partial
    assert (p.available, p.num_target_classes, p.partial_class_threshold, p.cls_weight, p.transfer_weight) == (
        True,
        25,
        14,
        0.5,
        0.1,
    )
    assert [cfg.domains[k].folder for k in ("Ar", "Cl", "Pr", "Re")] == ["Art", "Clipart", "Product", "Real_World"]


def test_office_home_has_the_papers_twelve_tasks_in_table_order():
    cfg = load_benchmark_config("office_home")
    expected = "Ar->Cl Ar->Pr Ar->Re Cl->Ar Cl->Pr Cl->Re Pr->Ar Pr->Cl Pr->Re Re->Ar Re->Cl Re->Pr".split()
    assert cfg.task_names() == expected
    assert set(cfg.tasks) == set(itertools.permutations(["Ar", "Cl", "Pr", "Re"], 2))


def test_visda_values():
    cfg = load_benchmark_config("visda")
    vit = cfg.backbones["vit_b16"]
    assert (vit.learning_rate, vit.head_lr_multiplier, vit.tau) == (3e-7, 1000, 1e-7)
    rn = cfg.backbones["rn101"]
    assert (rn.learning_rate, rn.head_lr_multiplier, rn.tau) == (3e-9, 10000, 1e-8)
    assert (cfg.cmkd_config["fixmatch_threshold"], cfg.cmkd_config["fixmatch_factor"]) == (0.80, 2.0)
    assert cfg.training_args["max_steps"] == 20000
    assert cfg.metric == "mean_class_accuracy" and cfg.table_layout == "per_class"
    assert cfg.task_names() == ["Syn->Real"]
    assert (cfg.domains["Syn"].folder, cfg.domains["Real"].folder) == ("train", "validation")
    assert (cfg.augmentation.train, cfg.augmentation.test) == ("visda_train", "visda_test")
    assert cfg.prompt_template == "a photo of a {}"


def test_domainnet_values():
    cfg = load_benchmark_config("domainnet")
    cc = cfg.cmkd_config
    assert (cc["lambda1"], cc["lambda2"], cc["lambda3"]) == (0.025, 0.1, 0.0025)
    assert (cc["fixmatch_threshold"], cc["fixmatch_factor"]) == (0.95, 0.1)
    assert cfg.training_args["max_steps"] == 40000 and cfg.num_classes == 345
    keys = ["clp", "inf", "pnt", "qdr", "rel", "skt"]
    assert len(cfg.tasks) == 30 and set(cfg.tasks) == set(itertools.permutations(keys, 2))
    assert cfg.task_names()[:5] == ["clp->inf", "clp->pnt", "clp->qdr", "clp->rel", "clp->skt"]
    assert cfg.requires_image_lists and cfg.eval_split == "test"
    assert cfg.domains["clp"].list_files == {"train": "clipart_train.txt", "test": "clipart_test.txt"}


def test_digits_values():
    cfg = load_benchmark_config("digits")
    assert cfg.task_names() == ["S->M", "U->M", "M->U"]
    assert cfg.batch_size == 64 and cfg.training_args["max_steps"] == 20000 and cfg.training_args["fp16"]
    assert cfg.prompt_template == 'a photo of the number: "{}"'
    assert cfg.classes == tuple(str(i) for i in range(10))
    assert cfg.augmentation.train_preset("U", "source") == "digits_usps_source"
    assert cfg.augmentation.train_preset("U", "target") == "digits_train"
    assert cfg.augmentation.train_preset("S", "source") == "digits_train"
    assert cfg.loader == "torchvision" and cfg.eval_split == "test"


def test_office31_and_image_clef_tasks():
    o31 = load_benchmark_config("office31")
    assert o31.task_names() == ["A->D", "A->W", "D->A", "D->W", "W->A", "W->D"] and o31.num_classes == 31
    assert o31.domains["A"].folder == "amazon/images" and o31.training_args["max_steps"] == 10000
    clef = load_benchmark_config("image_clef")
    assert clef.task_names() == ["I->P", "I->C", "P->I", "P->C", "C->I", "C->P"] and clef.num_classes == 12
    assert clef.requires_image_lists and len(clef.classes) == 12 and clef.training_args["max_steps"] == 10000


@pytest.mark.parametrize("name", ["office_home", "office31", "image_clef", "visda", "domainnet", "digits"])
def test_common_values(name):
    cfg = load_benchmark_config(name)
    assert cfg.training_args["seed"] == 42
    assert cfg.cmkd_config["label_smoothing"] == 0.1 and cfg.cmkd_config["lambda2"] == 0.1
    assert cfg.training_args["weight_decay"] == 5e-4 and cfg.training_args["sgd_momentum"] == 0.9
    assert cfg.partial.available == (name == "office_home")
    assert cfg.backbones["vit_b16"].head_lr_multiplier == 1000


def test_unknown_benchmark_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="available: digits"):
        load_benchmark_config("office_garden")
    src = (benchmarks.PRESETS_DIR / "office31.yaml").read_text()
    bad = tmp_path / "bad.yaml"
    bad.write_text(src.replace("  max_steps: 10000", "  max_steps: 10000\n  max_step: 5"))
    with pytest.raises(ConfigError, match="\\['max_step'\\] are not cmkd.CMKDTrainingArguments fields"):
        load_benchmark_config(bad)
    bad.write_text(src.replace("  - W->D", "  - W->X"))
    with pytest.raises(ConfigError, match="unknown domain key 'X'"):
        load_benchmark_config(bad)
    with pytest.raises(ConfigError, match="x.yaml: domains must be a non-empty mapping"):
        benchmarks.benchmark_from_dict({**yaml.safe_load(src), "domains": {}}, "x.yaml")


def test_benchmark_yaml_syntax_error_names_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: x\ndomains: {A: {name: a, folder: a}\n")
    with pytest.raises(ConfigError, match="mine.yaml is not valid YAML at line 3"):
        load_benchmark_config(bad)


@pytest.mark.parametrize(
    "preset, name",
    [("office_home", "office_home"), ("office31", "office31"), ("image_clef", "imageclef"), ("digits", "digits")]
    + [("visda", "visda"), ("domainnet", "domainnet")],
)
def test_library_benchmark_configs_match_the_presets(preset, name):
    """cmkd's CMKDConfig.for_benchmark (the library's shortcut) reads the presets the recipes read: the same values,
    and its ``<name>_partial`` is the recipes' --partial merge."""
    from cmkd import CMKDConfig

    cfg = load_benchmark_config(preset)
    assert CMKDConfig(**cfg.cmkd_config) == CMKDConfig.for_benchmark(name)
    if cfg.partial.available:
        merged = CMKDConfig(**{**cfg.cmkd_config, **cfg.partial.cmkd_config()})
        assert merged == CMKDConfig.for_benchmark(f"{name}_partial")


def test_override_is_merged_over_the_preset_and_named_in_errors():
    """A library user changes a preset without a file: nested keys merge, the rest of each section stays."""
    cfg = load_benchmark_config("office31", {"training_args": {"max_steps": 7}, "cmkd_config": {"lambda1": 0.5}})
    assert cfg.training_args["max_steps"] == 7 and cfg.training_args["seed"] == 42
    assert cfg.cmkd_config["lambda1"] == 0.5 and cfg.cmkd_config["lambda2"] == 0.1
    with pytest.raises(ConfigError, match="mine \\(over office31.yaml\\).training_args.seed must be an integer"):
        load_benchmark_config("office31", {"training_args": {"seed": "1"}}, "mine")
    assert load_benchmark_config("office31").training_args["max_steps"] == 10000  # the preset itself is unchanged


def test_package_path_resolves_cmkd_model_names_only():
    assert benchmarks.package_path("openai/clip-vit-base-patch16") == "openai/clip-vit-base-patch16"
    assert benchmarks.package_path("cmkd:assets/x") == str(benchmarks.PRESETS_DIR.parent / "assets" / "x")
