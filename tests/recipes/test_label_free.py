"""Recipes on a target without labels: flat folders, path lists, `datasets` without a label column; label-free
selection; labeled targets only for reporting; the errors that name the flag that fits."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_run_uda import CLASSES, make_office_home, make_tiny_clip, write_small_config

from cmkd.data import with_image_transform
from cmkd.image_sets import DataError
from cmkd.transforms import build_transform
from cmkd.validators import DEFAULT_VALIDATOR
from recipes import office_home
from recipes.core.data import load_target, split_source
from recipes.core.data_arguments import DataArguments

ORACLE = "oracle (uses target labels)"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("label_free")
    data = make_office_home(root / "OfficeHome")
    flat = root / "flat"
    flat.mkdir()
    paths = []
    for c in sorted(CLASSES):
        for image in sorted((data / "Clipart" / c).glob("*.png")):
            paths.append(shutil.copy(image, flat / f"{c}_{image.name}"))
    (root / "paths.txt").write_text("\n".join(f"flat/{Path(p).name}" for p in paths) + "\n")
    (root / "labeled.txt").write_text(
        "\n".join(f"OfficeHome/Clipart/{c}/{i}.png {k}" for k, c in enumerate(sorted(CLASSES)) for i in range(4))
        + "\n"
    )
    return {
        "root": root,
        "data": data,
        "flat": flat,
        "clip": make_tiny_clip(root / "tiny_clip"),
        "config": write_small_config(root / "small.yaml"),
    }


def flags(world, out: Path, *extra: str) -> list[str]:
    base = ["--config", str(world["config"]), "--data_dir", str(world["data"]), "--model", str(world["clip"])]
    base += [
        "--max_steps",
        "4",
        "--eval_steps",
        "2",
        "--batch_size",
        "4",
        "--learning_rate",
        "1e-3",
        "--dataloader_num_workers",
        "0",
    ]
    return [*base, "--quiet", "--output_dir", str(out), "-s", "Ar", *extra]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_flat_folder_target_trains_and_selects_without_labels(world, tmp_path):
    out = tmp_path / "run"
    results = office_home.main(flags(world, out, "--target_dir", str(world["flat"]), "--source_val_fraction", "0.5"))
    entry = results["methods"]["CMKD"]["Ar->flat"]
    assert entry["accuracy"] is None  # no target labels anywhere: nothing label-based is reported
    sel = entry["selection"]
    assert sel["metric"] == DEFAULT_VALIDATOR and sel["rule"].startswith("label-free")
    assert "oracle" not in sel and {"ent", "snd", "source_accuracy"} <= set(entry["validators"])
    card = (out / "Ar-flat" / "model" / "README.md").read_text()
    assert f"Checkpoint selection: label-free: {DEFAULT_VALIDATOR}" in card and "no target labels" in card
    assert "| CMKD | – | –† |" in (out / "results.md").read_text()  # task and average cells: no labels


def test_labeled_copy_reports_last_pick_oracle_and_gap(world, tmp_path):
    out = tmp_path / "run"
    eval_dir = str(world["data"] / "Clipart")
    extra = ("--target_dir", str(world["flat"]), "--eval_dir", eval_dir, "--keep_checkpoints")
    results = office_home.main(flags(world, out, *extra))
    entry = results["methods"]["CMKD"]["Ar->flat"]
    sel = entry["selection"]
    log = json.loads(sorted((out / "Ar-flat").glob("checkpoint-*"))[-1].joinpath("trainer_state.json").read_text())
    evals = [h for h in log["log_history"] if f"eval_{DEFAULT_VALIDATOR}" in h]
    accs = [h["eval_accuracy"] for h in evals]
    assert sel["oracle"]["accuracy"] == max(accs) and sel["last"]["accuracy"] == accs[-1]
    assert sel["gap"] == pytest.approx(max(accs) - sel["accuracy"])
    assert entry["accuracy"] == pytest.approx(sel["accuracy"])  # the reported model is the label-free pick
    table = (out / "results.md").read_text()
    assert ORACLE in table and "Label-free pick" in table and "Gap (points)" in table
    card = (out / "Ar-flat" / "model" / "README.md").read_text()
    assert ORACLE in card and "target labels used for reporting only" in card


def _pixels(ds):
    """The dataset as the trainer sees it: cmkd's transform API over the recipes' image column."""
    return with_image_transform(ds, build_transform("office_test", 8))


def test_image_list_and_dataset_without_labels_are_targets(world, tmp_path):
    from_list = _pixels(load_target(DataArguments(target_list=str(world["root"] / "paths.txt"))))
    assert len(from_list) == 12 and set(from_list[0]) == {"pixel_values"}
    from datasets import Dataset, Image

    ds = Dataset.from_dict({"image": [str(p) for p in sorted(world["flat"].glob("*.png"))]})
    ds.cast_column("image", Image()).save_to_disk(tmp_path / "ds")
    arrow = tmp_path / "ds"
    got = load_target(DataArguments(target_dataset_id=str(arrow)))
    assert len(got) == 12 and list(got.features) == ["image"]
    assert torch.equal(_pixels(got)[0]["pixel_values"], from_list[0]["pixel_values"])  # same first image


def test_labeled_data_given_as_unlabeled_says_which_flag_fits(world):
    classes = sorted(CLASSES)
    with pytest.raises(DataError, match=r"3 sub-folders with images .*pass it as --eval_dir"):
        load_target(DataArguments(target_dir=str(world["data"] / "Clipart")))
    with pytest.raises(DataError, match=r"look like 'path label'.*--eval_list"):
        load_target(DataArguments(target_list=str(world["root"] / "labeled.txt")))
    with pytest.raises(DataError, match=r"no class sub-folders.*--target_dir"):
        load_target(DataArguments(eval_dir=str(world["flat"])), classes)
    labeled = _pixels(load_target(DataArguments(eval_list=str(world["root"] / "labeled.txt")), classes))
    assert labeled[5]["labels"] == 1


def test_labeled_dataset_given_as_unlabeled_names_eval_dataset_id(world, tmp_path):
    from datasets import ClassLabel, Dataset, Features, Image

    paths = [str(p) for p in sorted(world["flat"].glob("*.png"))]
    features = Features({"image": Image(), "label": ClassLabel(names=sorted(CLASSES))})
    Dataset.from_dict({"image": paths, "label": [0] * len(paths)}, features=features).save_to_disk(tmp_path / "l")
    with pytest.raises(DataError, match="label column 'label'.*--eval_dataset_id"):
        load_target(DataArguments(target_dataset_id=str(tmp_path / "l")))


def test_selection_flags_name_what_supplies_them(world, tmp_path, capsys):
    target = ["--target_dir", str(world["flat"])]
    cases = [
        (["--selection", "oracle", *target], "--eval_dir"),
        (["--selection", "dev", *target], "--source_val_fraction"),
        ([*target, "--target_list", "x.txt"], "alternatives"),
        (["--source_val_fraction", "1.5", *target], r"\[0, 1\)"),
        (["-t", "Clipart", *target], "is a domain of Office-Home"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit):
            office_home.main(flags(world, tmp_path / "x", *extra))
        assert re.search(message, capsys.readouterr().err), message


def test_source_split_is_stratified_seeded_and_disjoint(world):
    from cmkd.image_sets import image_folder, image_paths, labels_of

    source = image_folder(world["data"] / "Art")
    train, held = split_source(source, 0.5, seed=3)
    assert len(train) + len(held) == len(source) and len(held) == 6
    assert sorted(labels_of(held)) == [0, 0, 1, 1, 2, 2]
    assert image_paths(split_source(source, 0.5, seed=3)[1]) == image_paths(held)
    assert not set(image_paths(train)) & set(image_paths(held))
    assert sorted(image_paths(train) + image_paths(held)) == sorted(image_paths(source))


def test_labeled_folder_alone_is_adapted_on_without_labels_and_oracle_is_named(world, tmp_path):
    labeled = load_target(DataArguments(eval_dir=str(world["data"] / "Clipart")), sorted(CLASSES))
    unlabeled = _pixels(labeled.remove_columns("label"))
    assert len(unlabeled) == len(labeled) and set(unlabeled[3]) == {"pixel_values"}
    out = tmp_path / "run"
    extra = ("--eval_dir", str(world["data"] / "Clipart"), "--selection", "oracle")
    entry = office_home.main(flags(world, out, *extra))["methods"]["CMKD"]["Ar->Clipart"]
    assert entry["selection"]["metric"] == "accuracy" and entry["selection"]["rule"].startswith(ORACLE)
    assert entry["selection"]["gap"] == 0.0


def test_labeled_target_with_other_classes_is_refused(world):
    from cmkd.image_sets import ClassMismatchError

    wrong = [*sorted(CLASSES)[:-1], "Zebra"]
    with pytest.raises(ClassMismatchError, match=r"only in the source: \['Zebra'\]; only in the labeled target"):
        load_target(DataArguments(eval_dir=str(world["data"] / "Clipart")), wrong)


def test_target_list_in_another_encoding_names_file_and_line(world, tmp_path):
    """--target_list is read like the labeled image lists: UTF-8, or a DataError naming the file, line and byte."""
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("# ok\ncaf\xe9.png\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8 text \(byte 0xe9\)"):
        load_target(DataArguments(target_list=str(bad)))
