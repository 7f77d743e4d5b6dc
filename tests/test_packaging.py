"""The wheel holds everything the packages read at run time, and an installed (non-editable) copy works alone.

The build runs offline: `pip wheel --no-build-isolation --no-index` uses the setuptools already installed. The
wheel is installed with `pip install --target` into a throwaway folder, and a fresh interpreter with only that
folder on its path (the repository is not on it) renders a model card, loads the tiny CLIP and the metric.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("peft_rst", "cmkd", "recipes")
NEEDED = [  # read at run time through paths relative to the package files
    "peft_rst/templates/rst_adapter.md",
    "cmkd/assets/tiny_clip_digits/model.safetensors",
    "cmkd/assets/tiny_clip_digits/config.json",
    "cmkd/assets/tiny_clip_digits/tokenizer.json",
    "cmkd/metrics/uda_accuracy/uda_accuracy.py",
    "cmkd/presets/office_home.yaml",
]


def _pip(*args: str, cwd: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def _source_files() -> list[str]:
    """Every file under the package folders, relative to the repository (what the wheel must carry)."""
    found = []
    for package in PACKAGES:
        for path in (REPO / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.append(path.relative_to(REPO).as_posix())
    return sorted(found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Build from a copy of what the build reads, so that no build/ or egg-info lands in the repository."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for package in PACKAGES:
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src), cwd=src)
    (built,) = dist.glob("rst_cmkd-*.whl")
    return built


@pytest.mark.slow  # builds and installs a wheel: ~10-20 s
def test_wheel_carries_every_package_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in NEEDED if name not in names]
    assert not missing, f"the wheel lacks {missing}"
    configs = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "cmkd" / "presets").glob("*.yaml"))
    assert len(configs) >= 6 and set(configs) <= names
    left_out = [name for name in _source_files() if name not in names]
    assert not left_out, f"files of the packages not in the wheel (add them to pyproject's package-data): {left_out}"
    assert not any(n.startswith(("tests/", "model_cards/", "docs/")) for n in names)


_INSTALLED_USE = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch
    from peft import get_peft_model

    site = Path(sys.argv[1]).resolve()
    import cmkd, peft_rst, recipes
    from cmkd.metrics import load_uda_accuracy
    from cmkd.toy import TINY_CLIP_PATH
    from peft_rst import RSTConfig
    from peft_rst.model_card import DEFAULT_TEMPLATE, write_model_card

    for module in (peft_rst, cmkd, recipes):
        assert Path(module.__file__).resolve().is_relative_to(site), module.__file__

    torch.manual_seed(0)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)), RSTConfig(tau=1e-3))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(torch.randn(8, 4)).square().mean().backward()
    opt.step()
    model.save_pretrained("adapter")
    card = write_model_card("adapter", dataset="office_home", source_domain="Art", target_domain="Clipart",
                            accuracy=0.5, repo_id="me/rst-ar-cl")
    print("TEMPLATE", Path(str(DEFAULT_TEMPLATE)).resolve().is_relative_to(site))
    print("CARD", card.read_text(encoding="utf-8").splitlines()[0], "RST adapter: Art" in card.read_text())

    from transformers import CLIPModel
    print("CLIP", CLIPModel.from_pretrained(TINY_CLIP_PATH).config.vision_config.image_size)
    metric = load_uda_accuracy()
    print("METRIC", metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])["accuracy"])
    """
)


@pytest.mark.slow
def test_installed_wheel_renders_a_model_card_without_the_repository(wheel, tmp_path):
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "-q", "--target", str(site), str(wheel), cwd=tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    # the repository is neither the cwd nor on PYTHONPATH: only the installed copy can be imported
    done = subprocess.run(
        [sys.executable, "-c", _INSTALLED_USE, str(site)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "TEMPLATE True" in out and "CARD --- True" in out, out
    assert "CLIP 32" in out and "METRIC 0.666" in out, out
