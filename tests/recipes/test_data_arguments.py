"""DataArguments: the recipes' data flags as transformers.HfArgumentParser parses them, and DataArguments.check's
errors (flag combinations: ConfigError; missing folders and files: DataNotFoundError), without scanning images."""

from pathlib import Path

import pytest
from transformers import HfArgumentParser

from cmkd.benchmarks import ConfigError, load_benchmark_config
from cmkd.image_sets import DataNotFoundError
from recipes.core.data_arguments import DataArguments

OFFICE_HOME = load_benchmark_config("office_home")
DIGITS = load_benchmark_config("digits")


def parse(*argv: str) -> DataArguments:
    (data,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(args=list(argv))
    return data


def test_flags_parse_like_the_cli():
    data = parse(
        "--data_dir", "d", "--image_list", "Ar=a.txt", "Clipart=c.txt", "--download", "--verify_images", "full"
    )
    assert data.image_list == ["Ar=a.txt", "Clipart=c.txt"] and data.download is True
    assert data.image_lists(OFFICE_HOME) == {"Ar": Path("a.txt"), "Cl": Path("c.txt")}  # by domain key
    assert data.verify_images == "full" and data.source_val_fraction == 0.0
    assert parse("--source_val_fraction", "0.25").source_val_fraction == 0.25
    assert not hasattr(data, "num_workers")  # one name: CMKDTrainingArguments.dataloader_num_workers
    with pytest.raises(SystemExit):
        parse("--verify_images", "everything")  # choices come from the Literal type


def test_help_text_reaches_argparse():
    text = HfArgumentParser(DataArguments).format_help()
    assert "--target_dir" in text and "flat folder of unlabeled target images" in text and "D=F" in text


def test_custom_target_names_and_labels(tmp_path):
    assert DataArguments(data_dir="d").custom_target() is None
    assert DataArguments(target_dir="some/flat/").custom_target() == "flat"
    assert DataArguments(target_list="lists/photos.txt").custom_target() == "photos"
    assert DataArguments(eval_dir="x/Clipart").custom_target("mine") == "mine"
    assert DataArguments(eval_dir="x").labeled_target(OFFICE_HOME, "x")
    assert not DataArguments(target_dir="x").labeled_target(OFFICE_HOME, "x")
    assert DataArguments(target_dir="x").labeled_target(OFFICE_HOME, "Cl")


@pytest.mark.parametrize(
    "flags, tasks, all_tasks, message",
    [
        (
            {"target_dir": "a", "target_list": "b"},
            [("Ar", "a")],
            False,
            "--target_dir, --target_list are alternatives",
        ),
        ({"eval_dir": "a", "eval_list": "b"}, [("Ar", "a")], False, "give the labeled target once"),
        ({"target_dir": "a"}, [("Ar", "Cl")], True, "--target_dir gives one target; run one task"),
        ({"target_dir": "a"}, [("Ar", "Clipart")], False, "--target Clipart is a domain of Office-Home"),
        ({"data_dir": "d", "source_val_fraction": 1.0}, [("Ar", "Cl")], False, r"must be in \[0, 1\), got 1.0"),
        ({"data_dir": "d", "image_list": ["Ar:a.txt"]}, [("Ar", "Cl")], False, "expects DOMAIN=FILE, got 'Ar:a.txt'"),
        (
            {"data_dir": "d", "image_list": ["Kitchen=a"]},
            [("Ar", "Cl")],
            False,
            "unknown Office-Home domain 'Kitchen'",
        ),
        ({"dataset_id": "x", "image_list_dir": "l"}, [("Ar", "Cl")], False, "--dataset_id reads images from the Hub"),
        ({"data_dir": "d", "download": True}, [("Ar", "Cl")], False, "--download only applies to digits"),
        ({"data_dir": "d", "domain_column": "dom"}, [("Ar", "Cl")], False, "only apply with --dataset_id"),
        ({}, [("Ar", "Cl")], False, "no data given: pass --data_dir"),
        ({"data_dir": "d"}, [("Ar", "photos")], False, "target 'photos' is not a domain of Office-Home"),
    ],
)
def test_flag_combinations_are_config_errors(flags, tasks, all_tasks, message):
    with pytest.raises(ConfigError, match=message):
        DataArguments(**flags).check(OFFICE_HOME, tasks, all_tasks=all_tasks)


def test_digits_refuse_image_lists():
    with pytest.raises(ConfigError, match="read with torchvision loaders"):
        DataArguments(data_dir="d", image_list_dir="l").check(DIGITS, [("U", "M")], all_tasks=False)


def test_missing_files_are_data_not_found_without_scanning(tmp_path):
    (tmp_path / "Art" / "chair").mkdir(parents=True)
    (tmp_path / "flat").mkdir()
    (tmp_path / "list.txt").write_text("a.png\n")
    ok = DataArguments(data_dir=str(tmp_path), target_dir=str(tmp_path / "flat"))
    ok.check_files(OFFICE_HOME, [("Ar", "flat")])  # the folders exist; their images are not opened
    DataArguments(data_dir=str(tmp_path), target_list=str(tmp_path / "list.txt")).check_files(
        OFFICE_HOME, [("Ar", "list")]
    )
    cases = [
        ({"data_dir": str(tmp_path / "nothing")}, [("Ar", "Cl")], "--data_dir .*nothing does not exist"),
        ({"data_dir": str(tmp_path)}, [("Ar", "Cl")], r"domain Cl \(Clipart\) not found"),
        ({"data_dir": str(tmp_path), "target_dir": str(tmp_path / "list.txt")}, [("Ar", "t")], "is a file, not a"),
        ({"data_dir": str(tmp_path), "eval_list": str(tmp_path / "flat")}, [("Ar", "t")], "is a folder, not a file"),
        ({"data_dir": str(tmp_path), "target_list": str(tmp_path / "no.txt")}, [("Ar", "t")], "no.txt does not exist"),
        ({"data_dir": str(tmp_path), "eval_dataset_id": "./nope"}, [("Ar", "t")], "nope does not exist"),
        ({"data_dir": str(tmp_path), "image_list": [f"Ar={tmp_path / 'no.txt'}"]}, [("Ar", "Cl")], "does not exist"),
    ]
    for flags, tasks, message in cases:
        with pytest.raises(DataNotFoundError, match=message):
            DataArguments(**flags).check_files(OFFICE_HOME, tasks)
    DataArguments(data_dir=str(tmp_path), eval_dataset_id="user/some-hub-id").check_files(
        OFFICE_HOME, [("Ar", "t")]
    )  # a Hub id is left to datasets
