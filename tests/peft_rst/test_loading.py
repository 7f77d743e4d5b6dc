"""Loading adapters is all-or-nothing, keeps training state intact, and refuses what it cannot load exactly (issue 9).

Items: 3 (names that match nothing), 4 (requires_grad after load_adapter mid-training), 5 (a refused load leaves the
model as it was), 6 (dense tensors are checksummed), 7 (entries the config does not target), 9 (reset against the
true w0 while an inference adapter is patched in), 13 (garbage adapter configs).
"""

from __future__ import annotations

import copy
import json
import zlib

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import BaseWeightsMismatchError, RSTConfig, RSTModel
from peft_rst.config import AdapterConfigError
from peft_rst.format import RSTFormatError

TAU = 1e-3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(6, 16)
        self.lin1 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.lin1(torch.tanh(self.lin0(x)))))


def base_model() -> Net:
    torch.manual_seed(0)
    return Net()


def train(model: nn.Module, steps: int = 3, lr: float = 0.05, seed: int = 1) -> torch.optim.Optimizer:
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(steps):
        x, y = torch.randn(8, 6, generator=g), torch.randint(0, 3, (8,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


def save_trained(folder, seed: int, **config) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = get_peft_model(base_model(), RSTConfig(tau=TAU, modules_to_save=["head"], **config))
    train(model, seed=seed)
    model.save_pretrained(folder)
    return load_file(folder / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for name, seed in (("a", 1), ("b", 2)):
        save_trained(root / name, seed)
    return root


def state(model: nn.Module) -> dict:
    """Everything a refused load must leave alone: bits of every parameter, flags, module tree, configs."""
    peft_config = getattr(model, "peft_config", None)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "tree": [(n, type(m).__name__, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "peft_config": {k: c.to_dict() for k, c in peft_config.items()} if isinstance(peft_config, dict) else None,
        "active": getattr(model, "active_adapters", None),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = state(model)
    assert after["tree"] == before["tree"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["peft_config"] == before["peft_config"]
    assert after["active"] == before["active"]
    assert after["params"].keys() == before["params"].keys()
    for name, value in before["params"].items():
        assert torch.equal(after["params"][name].view(torch.int32), value.view(torch.int32)), name


def variant(src, dst, *, tensors=None, config=None, raw: bytes | None = None):
    """A copy of adapter folder `src` with edited tensors (dict -> dict), config (dict -> dict) or raw file bytes."""
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps(config(cfg) if config else cfg))
    if raw is not None:
        (dst / "adapter_model.safetensors").write_bytes(raw)
    else:
        data = load_file(src / "adapter_model.safetensors")
        save_file(tensors(data) if tensors else data, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


def with_record(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Recompute `rst_integrity` by hand from docs/adapter-format.md (what a careless tool that re-saves does)."""
    others = {k: v for k, v in data.items() if k != "rst_integrity"}
    entries = {
        k: [str(t.dtype).removeprefix("torch."), list(t.shape), zlib.crc32(t.contiguous().view(torch.uint8).numpy())]
        for k, t in others.items()
    }
    body = b"RSTI\x02" + json.dumps(entries).encode()
    body += zlib.crc32(body).to_bytes(4, "little")
    return {**others, "rst_integrity": torch.frombuffer(bytearray(body), dtype=torch.uint8)}


def head_key(data) -> str:
    return next(k for k in data if k.endswith("head.weight"))


def flip_head(data):
    head = data[head_key(data)].clone()
    head.view(torch.int32)[0, 0] ^= 0x7F000000  # 0.08 -> ~1e37, the example
    return {**data, head_key(data): head}


def nan_head(data):
    head = data[head_key(data)].clone()
    head[0, 0] = float("nan")
    return with_record({**data, head_key(data): head})


def corrupt_values(data):
    key = next(k for k in data if k.endswith("lin1.rst_weight.weight.val"))
    return {**data, key: data[key] + 1.0}


BROKEN = {
    "bad-safetensors-header": dict(raw=b"\xff" * 64),
    "empty-file": dict(raw=b""),
    "flipped-head-byte": dict(tensors=flip_head),
    "nan-head-with-valid-checksums": dict(tensors=nan_head),
    "corrupt-rst-values": dict(tensors=corrupt_values),
    "modules_to_save-edited": dict(config=lambda c: {**c, "modules_to_save": ["lin1"]}),
    "target_modules-narrowed": dict(config=lambda c: {**c, "target_modules": ["lin0"]}),
    "exclude_modules-added": dict(config=lambda c: {**c, "exclude_modules": ["lin1"]}),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_refused_from_pretrained_leaves_the_base_model_as_it_was(folders, tmp_path, kind):
    broken = variant(folders / "a", tmp_path / kind, **BROKEN[kind])
    base = base_model()
    before = state(base)
    with pytest.raises(ValueError):  # RSTFormatError, AdapterConfigError and the others are ValueErrors
        PeftModel.from_pretrained(base, broken)
    assert_unchanged(base, before)
    assert not hasattr(base, "peft_config")


@pytest.mark.parametrize("kind", list(BROKEN))
@pytest.mark.parametrize("name", ["default", "new"])
def test_refused_load_adapter_leaves_the_model_and_its_adapters_as_they_were(folders, tmp_path, kind, name):
    """Also under the name of the adapter being trained: the failed load must not destroy it."""
    if name == "default" and "raw" not in BROKEN[kind] and "tensors" not in BROKEN[kind]:
        pytest.skip("peft keeps the existing config when loading under an existing name: nothing to refuse")
    broken = variant(folders / "a", tmp_path / kind, **BROKEN[kind])
    model = get_peft_model(base_model(), RSTConfig(tau=TAU, modules_to_save=["head"]))
    train(model)
    model.load_adapter(folders / "b", adapter_name="b")
    before = state(model)
    saved_before = get_peft_model_state_dict(model)
    # under an existing name peft reads the file before any RST code runs: safetensors' own error, model untouched;
    # peft itself refuses to put modules_to_save on a module that RST wraps for another adapter (TypeError)
    with pytest.raises((ValueError, SafetensorError, TypeError)):
        model.load_adapter(broken, adapter_name=name)
    assert_unchanged(model, before)
    saved_after = get_peft_model_state_dict(model)
    assert saved_after.keys() == saved_before.keys() and len(saved_after) > 3
    for key, value in saved_before.items():
        assert torch.equal(saved_after[key], value), key


@pytest.mark.parametrize(
    "kind, error, pattern",
    [
        ("bad-safetensors-header", RSTFormatError, r"adapter_model\.safetensors' cannot be read"),
        ("flipped-head-byte", RSTFormatError, r"head\.weight' fails its checksum"),
        ("nan-head-with-valid-checksums", RSTFormatError, r"head\.weight' contains NaN"),
        ("modules_to_save-edited", ValueError, r"no entry for 'head\.rst_weight\.weight'"),
        ("target_modules-narrowed", ValueError, r"does not target \(first: .*lin1\.rst_weight"),
        ("exclude_modules-added", ValueError, r"does not target \(first: .*lin1\.rst_weight"),
    ],
)
def test_refusals_say_what_is_wrong(folders, tmp_path, kind, error, pattern):
    broken = variant(folders / "a", tmp_path / kind, **BROKEN[kind])
    with pytest.raises(error, match=pattern):
        PeftModel.from_pretrained(base_model(), broken)


def test_other_base_weights_leave_requires_grad_flags_alone(folders):
    torch.manual_seed(123)
    other = Net()  # other base weights
    other.lin0.requires_grad_(False)
    before = state(other)
    with pytest.raises(BaseWeightsMismatchError):
        PeftModel.from_pretrained(other, folders / "a")
    assert_unchanged(other, before)
    assert other.lin1.weight.requires_grad and not other.lin0.weight.requires_grad


def test_a_failed_load_under_an_existing_name_keeps_it_saveable(folders, tmp_path):
    """The issue's sequence: a corrupt file under 'default' used to unload every layer; save then wrote 0 tensors."""
    model = PeftModel.from_pretrained(base_model(), folders / "a", is_trainable=True)
    broken = variant(folders / "a", tmp_path / "broken", tensors=corrupt_values)
    with pytest.raises(RSTFormatError):
        model.load_adapter(broken, adapter_name="default")
    model.save_pretrained(tmp_path / "again")
    again, original = (
        load_file(tmp_path / "again" / "adapter_model.safetensors"),
        load_file(folders / "a" / "adapter_model.safetensors"),
    )
    assert again.keys() == original.keys()
    for key in original:
        assert torch.equal(again[key], original[key]), key


# ------------------------------------------------------------------------------------------ item 4: requires_grad
def test_load_adapter_mid_training_keeps_the_trained_head_trainable(folders, monkeypatch):
    taken = []
    fast = RSTModel._add_inference_adapter_to_existing_layers
    monkeypatch.setattr(
        RSTModel, "_add_inference_adapter_to_existing_layers", lambda *a: taken.append(fast(*a)) or taken[-1]
    )
    model = get_peft_model(base_model(), RSTConfig(tau=TAU, modules_to_save=["head"]))
    optimizer = train(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.load_adapter(folders / "b", adapter_name="b")
    assert taken[-1] is True  # the fast path, which used to freeze the head
    after = {n: p.requires_grad for n, p in model.named_parameters()}
    assert {n: after[n] for n in flags} == flags
    assert not any(after[n] for n in after.keys() - flags.keys())  # the inference adapter itself is frozen
    head = model.base_model.model.head.modules_to_save["default"].weight
    assert head.requires_grad
    before = head.detach().clone()
    g = torch.Generator().manual_seed(9)
    nn.functional.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.tensor([0, 1, 2] * 2 + [0, 1])).backward()
    optimizer.step()
    assert not torch.equal(head.detach(), before), "training must keep changing the head after load_adapter"


# ------------------------------------------------------------------------------------------ item 9: reset vs w0
def test_step_while_an_inference_adapter_is_patched_in_resets_towards_the_true_w0(folders):
    pristine = dict(base_model().named_parameters())
    model = get_peft_model(base_model(), RSTConfig(tau=0.05, modules_to_save=["head"]))
    train(model, steps=2, lr=0.01)
    model.load_adapter(folders / "b", adapter_name="b")
    g = torch.Generator().manual_seed(5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    nn.functional.cross_entropy(model(torch.randn(8, 6, generator=g)), torch.tensor([0, 1, 2] * 2 + [0, 1])).backward()
    model.set_adapter("b")  # e.g. an evaluation between backward and step: b is written into the base weights
    optimizer.step()
    checked = 0
    for name, w in model.named_parameters():
        if ".rst_weight.default." not in name:
            continue
        module, _, param = name.partition(".rst_weight.default.")
        w0 = pristine[f"{module.removeprefix('base_model.model.')}.{param}"].detach()
        near = (w.detach() - w0).abs() <= 0.05
        assert torch.equal(w.detach()[near], w0[near]), f"{name}: entries within tau of w0 were not reset to w0"
        checked += int(near.sum())
    assert checked > 0
    model.set_adapter("b")
    layer = model.base_model.model.lin1
    assert layer._patched == "b" or layer(torch.zeros(1, 16)) is not None  # the patch comes back on use


# ------------------------------------------------------------------------------------------ item 3: names
def test_names_that_match_nothing_are_errors_that_list_real_names():
    with pytest.raises(ValueError, match=r"modules_to_save entry 'classifier' matches no module.*head"):
        get_peft_model(base_model(), RSTConfig(modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"target_modules entry 'lin2' matches no module.*Similar names: .*lin"):
        get_peft_model(base_model(), RSTConfig(target_modules=["lin0", "lin2"]))
    with pytest.raises(ValueError, match=r"exclude_modules entry 'lni1' matches no module.*lin1"):
        get_peft_model(base_model(), RSTConfig(exclude_modules=["lni1"]))
    with pytest.raises(ValueError, match=r"target_modules='lin\[5-9\]' \(a regex.*matches no module"):
        get_peft_model(base_model(), RSTConfig(target_modules="lin[5-9]"))
    model = base_model()
    before = state(model)
    with pytest.raises(ValueError):
        get_peft_model(model, RSTConfig(modules_to_save=["classifier"]))
    assert_unchanged(model, before)


def test_hf_classifier_head_is_called_classifier_and_the_error_says_so():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8)
    vit = ViTForImageClassification(config)
    with pytest.raises(ValueError, match=r"'head' matches no module.*classifier"):
        get_peft_model(vit, RSTConfig(modules_to_save=["head"]))
    model = get_peft_model(vit, RSTConfig(modules_to_save=["classifier"]))
    assert model.base_model.model.classifier.modules_to_save["default"].weight.requires_grad


# ------------------------------------------------------------------------------------------ item 13: configs
GARBAGE = {
    "lowercase-peft_type": (lambda c: json.dumps({**c, "peft_type": "rst"}), r"'peft_type' must be exactly \"RST\""),
    "empty": (lambda c: "", r"is empty"),
    "null": (lambda c: "null", r"must hold a JSON object.*got NoneType"),
    "list": (lambda c: "[]", r"must hold a JSON object.*got list"),
    "not-json": (lambda c: "{", r"is not valid JSON"),
    "bad-regex": (lambda c: json.dumps({**c, "target_modules": "("}), r"'target_modules' is not a valid regular"),
    "string-bool": (lambda c: json.dumps({**c, "check_base_fingerprint": "false"}), r"'check_base_fingerprint' must"),
    "modules_to_save-int": (lambda c: json.dumps({**c, "modules_to_save": 5}), r"'modules_to_save' must be a list"),
    "tau-string": (lambda c: json.dumps({**c, "tau": "1e-3"}), r"tau must be a number"),
    "peft_type-missing": (lambda c: json.dumps({k: v for k, v in c.items() if k != "peft_type"}), r"'peft_type'"),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
@pytest.mark.parametrize("how", ["PeftModel.from_pretrained", "load_adapter", "RSTConfig.from_pretrained"])
def test_garbage_configs_are_one_clear_error_naming_file_and_field(folders, tmp_path, kind, how):
    edit, pattern = GARBAGE[kind]
    folder = tmp_path / kind
    folder.mkdir()
    config = json.loads((folders / "a" / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(edit(config))
    (folder / "adapter_model.safetensors").write_bytes((folders / "a" / "adapter_model.safetensors").read_bytes())
    base = base_model()
    model = get_peft_model(base_model(), RSTConfig(tau=TAU)) if how == "load_adapter" else None
    before = state(model if model is not None else base)
    with pytest.raises(AdapterConfigError, match=pattern) as info:
        if how == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(base, folder)
        elif how == "load_adapter":
            model.load_adapter(folder, adapter_name="other")
        else:
            RSTConfig.from_pretrained(folder)
    assert str(folder / "adapter_config.json") in str(info.value)
    assert_unchanged(model if model is not None else base, before)


def test_valid_configs_still_load_through_peft_config(folders):
    config = PeftConfig.from_pretrained(folders / "a")
    assert isinstance(config, RSTConfig) and config.check_base_fingerprint is True
    model = PeftModel.from_pretrained(base_model(), folders / "a", config=config)
    assert (
        model.peft_config["default"].modules_to_save == ["head"]
        or "head" in model.peft_config["default"].modules_to_save
    )


def test_programmatic_configs_are_checked_too():
    with pytest.raises(ValueError, match=r"'check_base_fingerprint' must be true or false, got 'false'"):
        RSTConfig(check_base_fingerprint="false")
    with pytest.raises(ValueError, match=r"'target_modules' is not a valid regular expression"):
        RSTConfig(target_modules="(")
    with pytest.raises(ValueError, match=r"'modules_to_save' must be a list of module names, got the string"):
        RSTConfig(modules_to_save="head")


def test_loaded_model_after_refusals_still_equals_a_clean_load(folders, tmp_path):
    """A model that refused a broken file loads the good one afterwards exactly like a fresh model."""
    base = base_model()
    with pytest.raises(ValueError):
        PeftModel.from_pretrained(base, variant(folders / "a", tmp_path / "x", tensors=flip_head))
    loaded = PeftModel.from_pretrained(base, folders / "a")
    clean = PeftModel.from_pretrained(base_model(), folders / "a")
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), clean(x))
    assert copy.deepcopy(loaded) is not None
