"""The README's Python snippets run as written, and what .ci/run says about the README is true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CI_RUN = (REPO / ".ci" / "run").read_text(encoding="utf-8")

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)
SNIPPETS = [body for lang, body in _FENCE.findall(README) if lang == "python"]


def test_readme_has_python_snippets():
    assert SNIPPETS


@pytest.mark.slow  # loads the tiny CLIP twice and trains: ~10-30 s on a shared 2-core machine
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_python_snippet_runs_as_written(index, tmp_path, monkeypatch):
    """Each ```python block, alone in a fresh namespace, in an empty folder (files it writes land there)."""
    from peft import PeftModel

    from peft_rst import RSTModel

    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), namespace)

    # the RST walk-through: the reloaded adapter is RST, holds the trained head, and changes the base's outputs
    model = namespace.get("model")
    if isinstance(model, PeftModel) and isinstance(model.base_model, RSTModel):
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
        pixels = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            adapted = model(pixel_values=pixels).logits
            with model.disable_adapter():
                plain = model(pixel_values=pixels).logits
        assert not torch.allclose(adapted, plain)


def test_readme_test_command_is_what_ci_runs():
    tests = re.search(r"## Tests\n+```bash\n(.*?)\n```", README, re.DOTALL)
    assert tests, "README has no '## Tests' section with a bash block"
    for line in tests.group(1).splitlines():
        command = line.split("  #")[0].strip()
        if command and not command.startswith("#"):
            assert command in CI_RUN.splitlines(), f"README's test command {command!r} is not run by .ci/run"


def test_readme_sections_named_in_ci_run_exist():
    headings = re.findall(r"^#+ (.+)$", README, re.MULTILINE)
    named = re.findall(r'README "([^"]+)"', CI_RUN)
    assert named  # .ci/run points readers at the README
    for name in named:
        assert name in headings, f".ci/run refers to README section {name!r}; the README has {headings}"
