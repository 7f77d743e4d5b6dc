"""peft's own generic tuner tests (`PeftCommonTester` via `TestPeftCustomModel`), run with RST configs.

peft's source distribution ships its test suite. At test time the sdist of the installed peft version is fetched
from PyPI once (`pip download --no-binary :all:`), its `tests/` folder is cached outside the repository (nothing of
peft is vendored here) and a representative subset of the custom-model checks is called on peft's small models
(MLP, Conv2d, Embedding + GPT-2 Conv1D). Without network access and without a cache the module is skipped.

Cache: `$PEFT_RST_UPSTREAM_TESTS` if set (a folder holding peft's `tests/`), else ~/.cache/peft_rst/.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import peft
import pytest

from peft_rst import RSTConfig

pytestmark = pytest.mark.slow

_PACKAGE = "peft_upstream_tests"


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "peft_rst" / f"peft-{peft.__version__}-tests"


def _fetch_upstream_tests() -> Path:
    """peft's tests/ folder for the installed version, downloaded once (skip the module if impossible)."""
    override = os.environ.get("PEFT_RST_UPSTREAM_TESTS")
    if override:
        return Path(override)
    target = _cache_dir()
    if (target / "testing_common.py").exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        cmd += [f"peft=={peft.__version__}", "-d", tmp]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as err:
            pytest.skip(f"could not download the peft {peft.__version__} sdist from PyPI: {err}")
        sdists = list(Path(tmp).glob("peft-*.tar.gz"))
        if result.returncode != 0 or not sdists:
            pytest.skip(f"could not download the peft {peft.__version__} sdist from PyPI: {result.stderr[-500:]}")
        prefix = f"peft-{peft.__version__}/tests/"
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".staging-"))
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not any(m.name.endswith("/testing_common.py") for m in members):
                shutil.rmtree(staging)
                pytest.skip(f"the peft {peft.__version__} sdist ships no tests/testing_common.py")
            for member in members:
                member.name = member.name[len(prefix) :]
                tar.extract(member, staging, filter="data")
        if target.exists():
            shutil.rmtree(staging)
        else:
            os.replace(staging, target)
    return target


@pytest.fixture(scope="module")
def upstream():
    """peft's `test_custom_models` module, imported as a package of its own from the cached folder."""
    folder = _fetch_upstream_tests()
    stubbed = False
    if importlib.util.find_spec("diffusers") is None:
        # testing_common imports diffusers at the top for its stable-diffusion checks, which are not used here
        stub = types.ModuleType("diffusers")
        stub.__spec__ = importlib.machinery.ModuleSpec("diffusers", None)
        stub.StableDiffusionPipeline = None
        sys.modules["diffusers"] = stub
        stubbed = True
    package = types.ModuleType(_PACKAGE)
    package.__path__ = [str(folder)]
    package.__spec__ = importlib.machinery.ModuleSpec(_PACKAGE, None, is_package=True)
    sys.modules[_PACKAGE] = package
    try:
        module = importlib.import_module(f"{_PACKAGE}.test_custom_models")
    except Exception as err:  # an upstream layout this harness does not know
        pytest.skip(f"peft {peft.__version__}'s tests/test_custom_models.py could not be imported: {err!r}")
    finally:
        if stubbed:
            sys.modules.pop("diffusers", None)
    yield module
    for name in [m for m in sys.modules if m == _PACKAGE or m.startswith(_PACKAGE + ".")]:
        del sys.modules[name]


# peft's custom models and the RST targets used on them (None = every parameter, RST's default)
MODELS = {
    "MLP": None,
    "Conv2d": ["conv2d"],
    "EmbConv1D": ["emb", "conv1d"],  # nn.Embedding and transformers' Conv1D
}

# Checks that need an identity adapter at creation (RST's default) ...
IDENTITY = [
    "test_attributes_parametrized",
    "test_adapter_name",
    "test_from_pretrained_config_construction",
    "test_load_model_low_cpu_mem_usage",
    "test_load_multiple_adapters",
    "test_save_pretrained_adapter_name_substring",
    "test_save_load_roundtrip",
    "test_save_load_roundtrip_direct_injection",
    "test_inference_safetensors",
    "test_training_custom_models",
    "test_only_params_are_updated",
    "test_disable_adapters",
    "test_disable_adapters_with_merging",
    "test_disable_adapter_is_reentrant",
    "test_disable_adapters_exiting_context_restores_previous_state",
    "test_active_adapter",
    "test_delete_adapter",
    "test_delete_inactive_adapter",
    "test_delete_unknown_adapter_raises",
    "test_delete_adapter_properly_cleans_up_after_itself",
    "test_get_base_model_state_dict",
]
# ... and checks that need a non-identity one (peft's convention: init_weights=False)
PERTURBED = [
    "test_merge_layers",
    "test_merge_layers_fp16",
    "test_merge_layers_is_idempotent",
    "test_merge_layers_is_deterministic_in_train_mode",
    "test_safe_merge",
    "test_forward_output_finite",
    "test_forward_float16",
    "test_forward_bfloat16",
    "test_forward_float16_no_autocast",
    "test_delete_merged_adapter_raises_without_mutation",
    "test_peft_model_device_map",
]
BY_DESIGN = (
    "RST by design: an adapter loaded for inference keeps only its changed entries (held by the layer, outside "
    "state_dict) instead of a dense W, so the loaded model's state_dict keys differ from the trained model's, which "
    "these checks compare"
)
KNOWN = {
    "test_save_pretrained": BY_DESIGN,
    "test_parameters_after_loading_model": BY_DESIGN,
}

CASES = [
    pytest.param(method, model_id, init, id=f"{method}-{model_id}")
    for method, init in [*((m, True) for m in IDENTITY), *((m, False) for m in PERTURBED)]
    for model_id in MODELS
]
CASES += [
    pytest.param(method, model_id, True, id=f"{method}-{model_id}", marks=pytest.mark.xfail(strict=True, reason=why))
    for method, why in KNOWN.items()
    for model_id in MODELS
]


@pytest.mark.parametrize("method, model_id, init_weights", CASES)
def test_peft_custom_model_check(upstream, tmp_path, method, model_id, init_weights):
    tester = upstream.TestPeftCustomModel()
    kwargs = {"init_weights": init_weights}
    if MODELS[model_id] is not None:
        kwargs["target_modules"] = MODELS[model_id]
    check = getattr(tester, method)
    extra = {"tmp_path": tmp_path} if "tmp_path" in check.__code__.co_varnames else {}
    check(f"RST {model_id}", model_id, RSTConfig, kwargs, **extra)
