"""peft's own generic tuner tests (`PeftCommonTester` via `TestPeftCustomModel`), run with RST configs.

peft's source distribution ships its test suite; nothing of peft is vendored here. `python
scripts/fetch_peft_tests.py` (a step of `.ci/run`) downloads the sdist of the installed peft version once and caches
its `tests/` folder; this module only reads that cache and calls a representative subset of the custom-model checks
on peft's small models (MLP, Conv2d, Embedding + GPT-2 Conv1D). Without the cache the module skips, naming the
command. The tests themselves never download.

Cache: `$PEFT_RST_UPSTREAM_TESTS` if set (a folder holding peft's `tests/`), else ~/.cache/peft_rst/.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
import types
from pathlib import Path

import peft
import pytest

from peft_rst import RSTConfig

pytestmark = pytest.mark.slow

_PACKAGE = "peft_upstream_tests"
_FETCH_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fetch_peft_tests.py"


def _fetch_module() -> types.ModuleType:
    """scripts/fetch_peft_tests.py, the one place that knows where peft's tests are cached."""
    spec = importlib.util.spec_from_file_location("fetch_peft_tests", _FETCH_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fetch = _fetch_module()
UPSTREAM = _fetch.upstream_tests_dir()
if not (UPSTREAM / _fetch.MARKER).is_file():
    pytest.skip(
        f"peft {peft.__version__}'s own tests are not in {UPSTREAM}; fetch them once with `{_fetch.COMMAND}` "
        f"(downloads the peft sdist from PyPI), or set {_fetch.ENV_VAR} to a folder holding peft's tests/",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def upstream():
    """peft's `test_custom_models` module, imported as a package of its own from the cached folder."""
    folder = UPSTREAM
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
    # an adapter loaded for inference keeps only its changed entries; its state_dict() still shows w0 under the base
    # keys and a dense W per adapter, exactly like the trained model's
    "test_save_pretrained",
    "test_save_pretrained_pickle",
    "test_parameters_after_loading_model",
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
    "test_save_pretrained",
    "test_save_pretrained_pickle",
]
CASES = [
    pytest.param(method, model_id, init, id=f"{method}-{model_id}-{'identity' if init else 'perturbed'}")
    for method, init in [*((m, True) for m in IDENTITY), *((m, False) for m in PERTURBED)]
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
