"""cmkd.image_sets: image sets in one schema, read without opening an image; errors name the fix."""

from __future__ import annotations

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, Features, Image, Value
from PIL import Image as PILImage

from cmkd.image_sets import (
    ClassMismatchError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    check_same_classes,
    classes_of,
    files_dataset,
    filter_classes,
    hold_out,
    image_folder,
    image_paths,
    in_schema,
    labels_of,
    open_rgb,
    read_image_list,
    verify_images,
)

CLASSES = ["Alarm_Clock", "Backpack", "Bed"]


def _img(path, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.zeros((size[1], size[0], 3), np.uint8)).save(path)
    return path


def _tree(root, domains=("Art",), classes=CLASSES, per_class=2):
    for dom in domains:
        for c in classes:
            for i in range(per_class):
                _img(root / dom / c / f"{i:05d}.{'png' if i % 2 else 'jpg'}")
    return root


def test_labeled_folder_is_one_class_per_sub_folder_and_unlabeled_refuses_it(tmp_path):
    _tree(tmp_path)
    ds = image_folder(tmp_path / "Art")
    assert classes_of(ds) == CLASSES and labels_of(ds) == [0, 0, 1, 1, 2, 2] and ds.features["image"].decode is False
    with pytest.raises(DataError, match=r"--target_dir .* holds 3 sub-folders with images .*pass it as --eval_dir"):
        image_folder(tmp_path / "Art", labeled=False, name="--target_dir", other="--eval_dir")
    with pytest.raises(DataError, match="read it with labeled=True"):
        image_folder(tmp_path / "Art", labeled=False)
    flat = image_folder(tmp_path / "Art" / "Bed", labeled=False)
    assert "label" not in flat.features and len(flat) == 2
    with pytest.raises(DataNotFoundError, match="has no class sub-folders"):
        image_folder(tmp_path / "Art" / "Bed")


def test_labeled_list_given_as_unlabeled_names_the_alternative(tmp_path):
    _tree(tmp_path)
    lst = tmp_path / "Art.txt"
    lst.write_text("Art/Bed/00000.jpg 0\nArt/Bed/00001.png 0\n")
    with pytest.raises(DataError, match=r"2 of 2 lines look like 'path label'.*pass it as --eval_list"):
        read_image_list(lst, labeled=False, name="--target_list", other="--eval_list")
    paths = tmp_path / "paths.txt"
    paths.write_text("Art/Bed/00000.jpg\n")
    assert image_paths(read_image_list(paths, labeled=False)) == [str(tmp_path / "Art/Bed/00000.jpg")]


def test_in_schema_renames_columns_and_checks_labels():
    raw = Dataset.from_dict(
        {"img": [{"path": "a.png", "bytes": None}], "y": [1]},
        features=Features({"img": Image(), "y": ClassLabel(names=["cat", "dog"])}),
    )
    ds = in_schema(raw, "mine", labeled=True)
    assert list(ds.features) == ["image", "label"] and classes_of(ds) == ["cat", "dog"]
    with pytest.raises(DataError, match="mine has a label column 'y': a labeled dataset, pass it as --eval"):
        in_schema(raw, "mine", labeled=False, other="--eval")
    plain = raw.cast_column("y", Value("int64")).rename_column("y", "label")
    with pytest.raises(DataError, match="label column 'label' is no ClassLabel; give the class names"):
        in_schema(plain, "mine", labeled=True)
    assert classes_of(in_schema(plain, "mine", labeled=True, classes=["a", "b"])) == ["a", "b"]


def test_class_differences_are_listed_and_filter_keeps_the_label_set():
    a = files_dataset(["x", "y"], [0, 1], ["Bed", "Cup"])
    with pytest.raises(ClassMismatchError, match=r"only in A: \['Bed'\]; only in B: \['Dog'\]"):
        check_same_classes(a, ["Cup", "Dog"], ("A", "B"))
    with pytest.raises(ClassMismatchError, match="different label order, e.g. #0: Bed vs Cup"):
        check_same_classes(a, ["Cup", "Bed"])
    kept = filter_classes(a, [1])
    assert labels_of(kept) == [1] and classes_of(kept) == ["Bed", "Cup"]


def test_unreadable_images_are_named(tmp_path):
    good, bad = _img(tmp_path / "good.png"), tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    ds = files_dataset([str(good), str(bad)])
    with pytest.raises(CorruptImageError, match=r"1 of 2 images of domain X cannot be read:\n  .*bad.jpg"):
        verify_images(ds, "header", "domain X")
    assert verify_images(ds, "none") == 0 and open_rgb({"path": str(good), "bytes": None}).mode == "RGB"
    with pytest.raises(CorruptImageError, match="cannot read image .*bad.jpg.*verify_images"):
        open_rgb({"path": str(bad), "bytes": None})


@pytest.mark.parametrize(
    "content, message",
    [
        ("Art/Bed/00000.jpg\n", "Art.txt:1: expected 'relative/path label'"),
        ("Art/Bed/00000.jpg 0\nArt/Bed/00001.png x\n", "Art.txt:2: expected"),
        ("Art/Bed/00000.jpg 0\nArt/Bed/missing.jpg 0\n", "1 of 2 images listed in .*Art.txt do not exist"),
        ("Art/Bed/00000.jpg 0\nArt/Backpack/00000.jpg 0\n", "cannot name the classes.*class names in label order"),
        ("Art/Bed/00000.jpg 1\n", "labels \\[0\\] never appear"),
        ("# only a comment\n", "lists no images"),
    ],
)
def test_image_list_errors(tmp_path, content, message):
    _tree(tmp_path)
    lst = tmp_path / "Art.txt"
    lst.write_text(content)
    with pytest.raises(DataError, match=message):
        read_image_list(lst, tmp_path)


def test_latin1_image_list_names_the_file_and_line(tmp_path):
    (tmp_path / "caf\u00e9").mkdir()
    lst = tmp_path / "list.txt"
    lst.write_bytes("a/1.png 0\ncaf\u00e9/2.png 1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"list.txt:2: not UTF-8 text \(byte 0xe9\); image lists must be UTF-8"):
        read_image_list(lst, tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "1.png").write_bytes(b"x")
    (tmp_path / "caf\u00e9" / "2.png").write_bytes(b"x")
    lst.write_bytes("\ufeffa/1.png 0\ncaf\u00e9/2.png 1\n".encode())  # UTF-8 with a BOM reads fine
    assert classes_of(read_image_list(lst, tmp_path)) == ["a", "caf\u00e9"]


def test_hold_out_is_stratified_and_refuses_too_small_parts():
    ds = files_dataset([str(i) for i in range(20)], [i % 2 for i in range(20)], ["a", "b"])
    rest, held = hold_out(ds, 0.2, seed=0)
    assert len(held) == 4 and sorted(labels_of(held)) == [0, 0, 1, 1] and len(rest) == 16
    with pytest.raises(DataError, match="--val 0.2 holds out 4 images, fewer than the 5 needed"):
        hold_out(ds, 0.2, seed=0, name="--val", minimum=5)
    with pytest.raises(DataError, match="--val 0.05: .*raise the fraction"):
        hold_out(ds, 0.05, seed=0, name="--val")
