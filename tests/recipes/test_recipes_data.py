"""Domain loading (ImageFolder, image lists, Hub datasets, torchvision digits), its error paths, transforms and
DataLoader settings, on tiny data generated with PIL in tmp_path."""

import bz2
import dataclasses

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cmkd.benchmarks import load_benchmark_config
from cmkd.data import with_image_transform
from cmkd.image_sets import (
    ClassMismatchError,
    CorruptImageError,
    DataError,
    DataNotFoundError,
    check_same_classes,
    classes_of,
    filter_classes,
    image_paths,
    labels_of,
    verify_images,
)
from cmkd.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    build_transform,
    image_size_from_processor,
    normalization_from_processor,
)
from recipes.core.data import (
    bench_transform,
    default_num_workers,
    load_domain,
    partial_target,
    partial_target_classes,
)

CLASSES = ["Alarm_Clock", "Backpack", "Bed"]


def _img(path, size=(20, 16), color=None, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(str(path))) % 2**32)
    arr = np.full((size[1], size[0], 3), color, np.uint8) if color else rng.integers(0, 255, (size[1], size[0], 3))
    Image.fromarray(arr.astype(np.uint8)).save(path, format=fmt)
    return path


def _tree(root, domains=("Art", "Clipart"), classes=CLASSES, per_class=2):
    for dom in domains:
        for c in classes:
            for i in range(per_class):
                _img(root / dom / c / f"{i:05d}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.fixture
def office_home_3():
    """Office-Home's config with 3 classes, so tiny trees pass the class-count check."""
    return dataclasses.replace(load_benchmark_config("office_home"), num_classes=3)


# ------------------------------------------------------------------------------------------------------------------
# ImageFolder
# ------------------------------------------------------------------------------------------------------------------


def test_image_folder_domain(tmp_path, office_home_3):
    _tree(tmp_path)
    ds = load_domain(office_home_3, "Ar", data_dir=tmp_path)
    assert isinstance(ds, datasets.Dataset) and isinstance(ds.features["label"], datasets.ClassLabel)
    assert classes_of(ds) == CLASSES and len(ds) == 6 and labels_of(ds) == [0, 0, 1, 1, 2, 2]
    item = with_image_transform(ds, build_transform("office_test", 32))[2]
    x, y = item["pixel_values"], item["labels"]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 1
    same = load_domain(office_home_3, "clipart", data_dir=tmp_path)  # by name, case-insensitive
    check_same_classes(ds, same)
    assert same[0]["image"]["path"].endswith(".jpg")  # lazily decoded: a file reference until transformed


def test_normalisation_matches_hand_computation(tmp_path, office_home_3):
    for c in CLASSES:
        _img(tmp_path / "Art" / c / "a.png", color=(200, 100, 50))
    ds = with_image_transform(load_domain(office_home_3, "Ar", data_dir=tmp_path), build_transform("office_test", 8))
    x = ds[0]["pixel_values"]
    expected = [(v / 255 - m) / s for v, m, s in zip((200, 100, 50), CLIP_MEAN, CLIP_STD)]
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)


def test_alternative_shipped_folder_name(tmp_path, office_home_3):
    _tree(tmp_path, domains=("Real World",))
    assert len(load_domain(office_home_3, "Re", data_dir=tmp_path)) == 6


def test_missing_data_dir_and_domain_explain_where_to_get_data(tmp_path, office_home_3):
    with pytest.raises(DataNotFoundError) as exc:
        load_domain(office_home_3, "Ar", data_dir=tmp_path / "nope")
    msg = str(exc.value)
    assert "does not exist" in msg and "hemanthdv.org" in msg and "Art/<class name>/<image files>" in msg
    assert "docs/datasets.md#office-home" in msg and "non-commercial" in msg
    _tree(tmp_path, domains=("Art",))
    with pytest.raises(DataNotFoundError, match="domain Pr \\(Product\\) not found: looked for .*Product"):
        load_domain(office_home_3, "Pr", data_dir=tmp_path)


def test_unknown_domain_lists_valid_ones(tmp_path, office_home_3):
    with pytest.raises(DataError, match="unknown Office-Home domain 'Kitchen'; valid domains: Ar \\(Art\\)"):
        load_domain(office_home_3, "Kitchen", data_dir=tmp_path)


def test_class_count_must_match_benchmark(tmp_path):
    _tree(tmp_path)
    with pytest.raises(ClassMismatchError, match="has 3 classes but Office-Home has 65"):
        load_domain("office_home", "Ar", data_dir=tmp_path)


def test_classes_differing_between_domains_are_listed(tmp_path, office_home_3):
    _tree(tmp_path, domains=("Art",))
    _tree(tmp_path, domains=("Clipart",), classes=["Alarm_Clock", "Backpack", "Couch"])
    src = load_domain(office_home_3, "Ar", data_dir=tmp_path)
    tgt = load_domain(office_home_3, "Cl", data_dir=tmp_path)
    with pytest.raises(ClassMismatchError, match="only in Ar: \\['Bed'\\]; only in Cl: \\['Couch'\\]"):
        check_same_classes(src, tgt, ("Ar", "Cl"))
    reordered = src.cast_column("label", datasets.ClassLabel(names=["Backpack", "Alarm_Clock", "Bed"]))
    with pytest.raises(ClassMismatchError, match="different label order, e.g. #0: Alarm_Clock vs Backpack"):
        check_same_classes(src, reordered)


def test_empty_class_folder_is_an_error(tmp_path, office_home_3):
    _tree(tmp_path, domains=("Art",), classes=["Alarm_Clock", "Backpack"])
    (tmp_path / "Art" / "Bed").mkdir()
    (tmp_path / "Art" / "Bed" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="1 class folder\\(s\\) under .*Art hold no images \\(Bed"):
        load_domain(office_home_3, "Ar", data_dir=tmp_path)


def test_unreadable_images_lazy_and_eager(tmp_path, office_home_3):
    _tree(tmp_path, domains=("Art",))
    garbage = tmp_path / "Art" / "Bed" / "zz_garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg")
    good = tmp_path / "Art" / "Bed" / "zz_truncated.jpg"
    data = _img(tmp_path / "tmp.jpg", size=(64, 64)).read_bytes()
    good.write_bytes(data[: len(data) // 2])  # valid header, truncated body
    ds = load_domain(office_home_3, "Ar", data_dir=tmp_path)  # verify="none": scanning does not open images
    idx = image_paths(ds).index(str(garbage))
    with pytest.raises(CorruptImageError, match=f"cannot read image {garbage}"):
        with_image_transform(ds, build_transform("office_test", 8))[idx]
    with pytest.raises(CorruptImageError) as exc:
        load_domain(office_home_3, "Ar", data_dir=tmp_path, verify_images="header")
    assert "1 of 8 images" in str(exc.value) and str(garbage) in str(exc.value) and str(good) not in str(exc.value)
    with pytest.raises(CorruptImageError) as exc:
        verify_images(ds, "full")
    assert "2 of 8 images" in str(exc.value) and str(good) in str(exc.value)


def test_transformed_is_a_lazy_view(tmp_path, office_home_3):
    """cmkd's with_image_transform over the same rows: the dataset itself is unchanged, FixMatch adds a strong view."""
    _tree(tmp_path, domains=("Art",))
    ds = load_domain(office_home_3, "Ar", data_dir=tmp_path)
    t = with_image_transform(ds, build_transform("office_test", 16), build_transform("fixmatch_strong", 16))
    assert t.data.table is ds.data.table and ds.format["type"] is None and "image" in ds[0]
    assert t[0]["pixel_values"].shape == t[0]["pixel_values_strong"].shape == (3, 16, 16)


# ------------------------------------------------------------------------------------------------------------------
# Image lists
# ------------------------------------------------------------------------------------------------------------------


def test_image_list_with_spaces_comments_and_derived_classes(tmp_path, office_home_3):
    _tree(tmp_path, domains=("Real World",))
    lines = ["# Office-Home Real World", ""]
    for label, c in [(2, "Alarm_Clock"), (0, "Backpack"), (1, "Bed")]:  # non-alphabetical label order
        lines += [f"Real World/{c}/00000.jpg {label}", f"Real World/{c}/00001.png {label}"]
    lst = tmp_path / "lists" / "Real_World.txt"
    lst.parent.mkdir()
    lst.write_text("\n".join(lines) + "\n")
    ds = load_domain(office_home_3, "Re", data_dir=tmp_path, image_list=[f"Re={lst}"])
    assert classes_of(ds) == ["Backpack", "Bed", "Alarm_Clock"] and len(ds) == 6
    assert labels_of(ds) == [2, 2, 0, 0, 1, 1]
    via_dir = load_domain(office_home_3, "Re", data_dir=tmp_path, image_list_dir=tmp_path / "lists")
    assert image_paths(via_dir) == image_paths(ds) and labels_of(via_dir) == labels_of(ds)


def test_flat_folders_use_yaml_class_names(tmp_path):
    """ImageCLEF ships flat per-domain folders; labels and names come from the list + YAML."""
    clef = load_benchmark_config("image_clef")
    lines = []
    for label in range(12):
        lines.append(f"c/{label}_a.jpg {label}")
        _img(tmp_path / "c" / f"{label}_a.jpg")
    (tmp_path / "list").mkdir()
    (tmp_path / "list" / "c_list.txt").write_text("\n".join(lines))
    ds = load_domain(clef, "C", data_dir=tmp_path)  # list found under <data_dir>/list
    assert classes_of(ds)[:3] == ["aeroplane", "bike", "bird"] and labels_of(ds) == list(range(12))


def test_required_image_list_missing(tmp_path):
    dn = dataclasses.replace(load_benchmark_config("domainnet"), num_classes=3)
    _tree(tmp_path, domains=("clipart",))
    with pytest.raises(DataNotFoundError, match="needs the image list clipart_test.txt.*ai.bu.edu/M3SDA"):
        load_domain(dn, "clp", data_dir=tmp_path, split="test")
    lines = [f"clipart/{c}/00000.jpg {i}" for i, c in enumerate(CLASSES)]
    (tmp_path / "clipart_test.txt").write_text("\n".join(lines))
    ds = load_domain(dn, "clipart", data_dir=tmp_path, split="test")
    assert len(ds) == 3 and classes_of(ds) == CLASSES
    with pytest.raises(DataNotFoundError, match="not found in --image_list_dir"):
        load_domain(dn, "clp", data_dir=tmp_path, image_list_dir=tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------------------------------
# Hub datasets (through the real datasets.load_dataset, on local files / offline)
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _datasets_cache_in_tmp(tmp_path, monkeypatch):
    """datasets.load_dataset caches under tmp_path, not the user's cache (load_domain takes no cache_dir)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _hub_dir(tmp_path):
    import datasets

    rows = {"image": [], "label": [], "domain": []}
    for dom in ("Art", "Clipart"):
        for label in range(3):
            rows["image"].append(Image.fromarray(np.full((12, 12, 3), 40 * label + 10, np.uint8)))
            rows["label"].append(label)
            rows["domain"].append(dom)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES), "domain": datasets.Value("string")}
    )
    out = tmp_path / "hub_ds"
    (out / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(out / "data" / "train-00000-of-00001.parquet"))
    return out


def test_hub_dataset_with_domain_column(tmp_path, office_home_3):
    path = _hub_dir(tmp_path)
    ds = load_domain(
        office_home_3,
        "Cl",
        dataset_id=str(path),
        domain_column="domain",
    )
    assert classes_of(ds) == CLASSES and len(ds) == 3 and labels_of(ds) == [0, 1, 2]
    item = with_image_transform(ds, build_transform("office_test", 8))[1]
    x, y = item["pixel_values"], item["labels"]
    assert x.shape == (3, 8, 8) and y == 1
    expected = (50 / 255 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert torch.allclose(x[0], torch.full((8, 8), expected), atol=1e-5)
    with pytest.raises(DataError, match="--domain_column 'dom' not in"):
        load_domain(office_home_3, "Cl", dataset_id=str(path), domain_column="dom")


def test_dataset_saved_to_disk_is_a_source(tmp_path, office_home_3):
    """--dataset_id also takes a save_to_disk folder: the same loader as the --*_dataset_id targets."""
    files = str(_hub_dir(tmp_path) / "data" / "*.parquet")
    rows = datasets.load_dataset("parquet", data_files=files, split="train")
    rows.save_to_disk(str(tmp_path / "saved"))
    ds = load_domain(office_home_3, "Ar", dataset_id=str(tmp_path / "saved"), domain_column="domain")
    assert classes_of(ds) == CLASSES and labels_of(ds) == [0, 1, 2] and list(ds.features) == ["image", "label"]


def test_hub_dataset_offline_error(tmp_path, monkeypatch, office_home_3):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataNotFoundError) as exc:
        load_domain(office_home_3, "Ar", dataset_id="someone/office-home")
    msg = str(exc.value)
    assert "could not reach the Hub for dataset 'someone/office-home'" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "local path" in msg


# ------------------------------------------------------------------------------------------------------------------
# torchvision digits
# ------------------------------------------------------------------------------------------------------------------


def _fake_usps(root, name, labels):
    lines = []
    rng = np.random.default_rng(0)
    for label in labels:  # LIBSVM format, labels 1..10, 256 values in [-1, 1]
        values = rng.uniform(-1, 1, 256)
        lines.append(f"{label + 1} " + " ".join(f"{i + 1}:{v:.4f}" for i, v in enumerate(values)))
    with bz2.open(root / name, "wt") as fh:
        fh.write("\n".join(lines) + "\n")


def test_torchvision_usps_and_missing_mnist(tmp_path):
    digits = load_benchmark_config("digits")
    _fake_usps(tmp_path, "usps.bz2", [3, 0, 9])
    tf = bench_transform(digits, digits.augmentation.train_preset("U", "source"), image_size=32)
    ds = load_domain(digits, "U", data_dir=tmp_path)
    assert classes_of(ds) == [str(i) for i in range(10)] and labels_of(ds) == [3, 0, 9]
    item = with_image_transform(ds, tf)[0]
    x, y = item["pixel_values"], item["labels"]
    assert x.shape == (3, 32, 32) and y == 3
    with pytest.raises(DataNotFoundError, match="USPS \\(test\\) not found.*usps.t.bz2.*pass --download"):
        load_domain(digits, "usps", data_dir=tmp_path, split="test")
    with pytest.raises(DataNotFoundError, match="MNIST \\(train\\) not found.*MNIST/raw.*--download"):
        load_domain(digits, "M", data_dir=tmp_path)
    with pytest.raises(DataNotFoundError, match="SVHN \\(test\\) not found.*test_32x32.mat"):
        load_domain(digits, "S", data_dir=tmp_path, split="test")


# ------------------------------------------------------------------------------------------------------------------
# Classes, partial set
# ------------------------------------------------------------------------------------------------------------------


def test_class_names_for_prompts():
    """The recipes' folder names reach the prompts through cmkd's one clean-up (no copy in the recipes)."""
    from cmkd.model import format_class_name

    names = ["Alarm_Clock", "TV", "The_Eiffel_Tower", "teddy-bear", "0", "back_pack"]
    assert [format_class_name(n) for n in names] == [
        "alarm clock",
        "tv",
        "the eiffel tower",
        "teddy-bear",
        "0",
        "back pack",
    ]


def test_partial_set_keeps_first_classes_alphabetically(tmp_path):
    classes = ["Drill", "Exit_Sign", "Bottle", "Alarm_Clock", "Couch"]  # list order is not alphabetical
    assert partial_target_classes(classes, 3) == [2, 3, 4]  # Alarm_Clock, Bottle, Couch
    with pytest.raises(ValueError):
        partial_target_classes(classes, 6)
    oh = dataclasses.replace(load_benchmark_config("office_home"), num_classes=5)
    oh = dataclasses.replace(oh, partial=dataclasses.replace(oh.partial, num_target_classes=2))
    _tree(tmp_path, domains=("Product",), classes=sorted(classes), per_class=1)
    ds = load_domain(oh, "Pr", data_dir=tmp_path)
    part = partial_target(ds, oh)
    assert classes_of(part) == classes_of(ds)  # label ids keep their meaning
    assert labels_of(part) == [0, 1] and len(part) == 2
    again = filter_classes(part, [1])
    assert labels_of(again) == [1] and image_paths(again) == [image_paths(ds)[1]]


# ------------------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------------------


def test_presets_scale_with_image_size():
    t = build_transform("office_train", 32)
    resize = next(s for s in t.transforms if type(s).__name__ == "Resize")
    assert resize.size == (37, 37)  # 256 * 32 / 224 = 36.6
    full = build_transform("office_train", 224)
    assert next(s for s in full.transforms if type(s).__name__ == "Resize").size == (256, 256)
    img = Image.fromarray(np.zeros((50, 70, 3), np.uint8))
    for preset in ("office_train", "office_test", "visda_train", "visda_test", "digits_train", "fixmatch_strong"):
        assert build_transform(preset, 24)(img).shape == (3, 24, 24), preset
    gray = Image.fromarray(np.zeros((16, 16), np.uint8), mode="L")  # USPS-like
    for preset in ("digits_usps_source", "digits_test", "digits_train"):
        assert build_transform(preset, 24)(gray).shape == (3, 24, 24), preset
    with pytest.raises(ValueError, match="unknown transform 'office'"):
        build_transform("office")


def _views(bench, domain, role, size=None):
    """(training view, FixMatch strong view) of ``domain`` as ``role``, from the preset's names."""
    aug = bench.augmentation
    train = bench_transform(bench, aug.train_preset(domain, role), image_size=size)
    return train, bench_transform(bench, aug.strong, image_size=size)


def test_train_transform_roles_and_fixmatch_views():
    torch.manual_seed(0)
    oh = load_benchmark_config("office_home")
    weak_tf, strong_tf = _views(oh, "Cl", "target", 16)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 30, 3), dtype=np.uint8))
    weak, strong = weak_tf(img), strong_tf(img)
    assert weak.shape == strong.shape == (3, 16, 16) and not torch.equal(weak, strong)
    assert oh.augmentation.train_preset("Ar", "source") != oh.augmentation.strong  # the source gets no strong view
    digits = load_benchmark_config("digits")
    usps_src = _views(digits, "U", "source")[0]
    assert any(type(s).__name__ == "RandomRotation" for s in usps_src.transforms)
    assert not any(type(s).__name__ == "RandomRotation" for s in _views(digits, "U", "target")[0].transforms)


def test_normalisation_and_size_from_hf_processor():
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor(image_mean=[0.5, 0.5, 0.5], image_std=[0.25, 0.25, 0.25], crop_size=32, size=32)
    assert normalization_from_processor(proc) == ((0.5,) * 3, (0.25,) * 3)
    assert image_size_from_processor(proc) == 32
    assert normalization_from_processor(None) == (CLIP_MEAN, CLIP_STD)
    office31 = load_benchmark_config("office31")
    tf = bench_transform(office31, office31.augmentation.test, processor=proc)
    x = tf(Image.fromarray(np.full((40, 40, 3), 255, np.uint8)))
    assert x.shape == (3, 32, 32) and torch.allclose(x, torch.full_like(x, 2.0))  # (1 - 0.5) / 0.25


def test_fixmatch_strong_view_is_the_releases_timm_randaugment():
    """The preset's strong view is cmkd's one transform stack: timm's rand-n2-m10-mstd0.5 (the release's)."""
    from timm.data.auto_augment import RandAugment

    oh = load_benchmark_config("office_home")
    weak, strong = _views(oh, "Cl", "target", 16)
    (ra,) = [s for s in strong.transforms if isinstance(s, RandAugment)]
    assert (
        ra.num_layers == 2 and {op.magnitude for op in ra.ops} == {10} and {op.magnitude_std for op in ra.ops} == {0.5}
    )
    assert not any(isinstance(s, RandAugment) for s in weak.transforms)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 20, 3), dtype=np.uint8))
    from transformers import set_seed  # torch, numpy and python's random: what cmkd seeds per item

    set_seed(0)
    first = strong(img)
    set_seed(0)
    assert torch.equal(first, strong(img))  # a function of the seed: cmkd seeds each item's augmentation


# ------------------------------------------------------------------------------------------------------------------
# DataLoader
# ------------------------------------------------------------------------------------------------------------------


def test_default_num_workers_is_the_available_cpus_capped():
    import os

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_num_workers() == min(8, cpus) and default_num_workers(1) == 1


def test_dict_items_feed_cmkd_paired_loader(tmp_path, office_home_3):
    """with_image_transform() yields the items cmkd's paired DataLoader collates (FixMatch strong view included)."""
    torch.manual_seed(0)
    _tree(tmp_path)
    oh = office_home_3
    src = with_image_transform(load_domain(oh, "Ar", data_dir=tmp_path), _views(oh, "Ar", "source", 16)[0])
    tgt = with_image_transform(load_domain(oh, "Cl", data_dir=tmp_path), *_views(oh, "Cl", "target", 16))
    item = tgt[0]
    assert set(item) == {"pixel_values", "pixel_values_strong", "labels"} and item["pixel_values"].shape == (3, 16, 16)
    cmkd_data = pytest.importorskip("cmkd.data")
    loader = cmkd_data.make_paired_dataloader(src, tgt, source_batch_size=2, seed=0)
    batch = next(iter(loader))
    assert batch["source_pixel_values"].shape == (2, 3, 16, 16) and batch["source_labels"].dtype == torch.long
    assert batch["target_pixel_values"].shape == batch["target_strong_pixel_values"].shape == (2, 3, 16, 16)


@pytest.mark.parametrize("name", ["office_home", "office31", "image_clef", "visda", "domainnet", "digits"])
def test_missing_data_message_points_at_an_existing_docs_section(tmp_path, name):
    import re
    from pathlib import Path

    cfg = load_benchmark_config(name)
    with pytest.raises(DataNotFoundError) as exc:
        load_domain(cfg, cfg.tasks[0][0], data_dir=tmp_path / "missing")
    msg = str(exc.value)
    assert cfg.homepage in msg and cfg.license in msg
    anchor = re.search(r"docs/datasets\.md#([\w-]+)", msg).group(1)
    docs = (Path(__file__).resolve().parents[2] / "docs" / "datasets.md").read_text()
    headings = re.findall(r"^## (.+)$", docs, re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}
    assert anchor in slugs
    assert "does not exist" in msg
