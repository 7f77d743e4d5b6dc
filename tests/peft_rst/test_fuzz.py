"""Seeded fuzzing of saved RST adapters: byte flips and truncations of every tensor and of the safetensors header,
and mutations of every adapter_config.json field (issue 9, "What it must show").

Every mutated folder is loaded four ways: `PeftModel.from_pretrained` onto a fresh base, `load_adapter` under the
name of the loaded adapter, `load_adapter` under a new name, and transformers' `PreTrainedModel.load_adapter`
(which hands the tensors to peft under other keys, see `peft_rst.transformers_integration`). A load either is
refused, and then the model is exactly as before (parameters bit for bit, requires_grad flags, module tree,
peft_config, active adapter), or it succeeds, and then the adapter holds exactly the tensors of the original file.
A successful load of a file whose tensor bytes were changed is a silent accept; the test counts them and requires
none.
"""

from __future__ import annotations

import json
import math
import random
import struct
from collections import Counter

import torch
from peft import PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

import peft_rst  # noqa: F401  (registers RST)
from peft_rst import RSTConfig

SEED = 9_2026
FLIPS_PER_TENSOR = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0 = nn.Linear(4, 8)
        self.norm = nn.LayerNorm(8)
        self.lin1 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin1(self.norm(self.lin0(x)))))


def base_model() -> Net:
    torch.manual_seed(0)
    return Net()


class HFNet(PreTrainedModel):
    """`Net` as a transformers model, for transformers' own `load_adapter`."""

    config_class = PretrainedConfig

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        net = Net()
        self.lin0, self.norm, self.lin1, self.head = net.lin0, net.norm, net.lin1, net.head

    def forward(self, x):
        return self.head(torch.tanh(self.lin1(self.norm(self.lin0(x)))))


def hf_base_model() -> HFNet:
    model = HFNet(PretrainedConfig())
    model.load_state_dict(base_model().state_dict())
    return model.eval()


def snapshot(model: nn.Module) -> dict:
    config = getattr(model, "peft_config", None)
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters(remove_duplicate=False)},
        "flags": {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
        "tree": [(n, type(m).__name__, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "config": {k: c.to_dict() for k, c in config.items()} if isinstance(config, dict) else None,
        "active": getattr(model, "active_adapters", None),
    }


def differences(model: nn.Module, before: dict) -> list[str]:
    after = snapshot(model)
    found = [what for what in ("flags", "tree", "config", "active") if after[what] != before[what]]
    if after["params"].keys() != before["params"].keys():
        found.append("parameter names")
    else:
        found += [
            f"bits of {n}"
            for n, p in before["params"].items()
            if not torch.equal(after["params"][n].view(torch.uint8), p.view(torch.uint8))
        ]
    return found


def same_tensors(state: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> bool:
    return state.keys() == original.keys() and all(
        state[k].dtype == original[k].dtype
        and state[k].shape == original[k].shape
        and torch.equal(state[k].contiguous().view(torch.uint8), original[k].contiguous().view(torch.uint8))
        for k in original
    )


def byte_mutations(raw: bytes, rng: random.Random) -> list[tuple[str, bool, bytes]]:
    """(label, changes tensor bytes, mutated file) for flips and cuts in every tensor and in the header."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    data_start = 8 + header_len
    out = []
    for key, info in sorted(header.items()):
        if key == "__metadata__":
            continue
        start, end = (data_start + o for o in info["data_offsets"])
        if end == start:
            continue
        for _ in range(FLIPS_PER_TENSOR):
            pos, bit = rng.randrange(start, end), rng.randrange(8)
            flipped = bytearray(raw)
            flipped[pos] ^= 1 << bit
            out.append((f"flip {key}[{pos - start}] bit {bit}", True, bytes(flipped)))
        out.append((f"cut in {key}", True, raw[: rng.randrange(start, end)]))
    for _ in range(12):  # the JSON header: key names, dtypes, shapes, offsets, metadata
        pos, bit = rng.randrange(0, data_start), rng.randrange(8)
        flipped = bytearray(raw)
        flipped[pos] ^= 1 << bit
        out.append((f"flip header[{pos}] bit {bit}", False, bytes(flipped)))
    for cut in (0, 4, rng.randrange(8, data_start)):
        out.append((f"cut header at {cut}", True, raw[:cut]))
    return out


def config_mutations(config: dict) -> list[tuple[str, str]]:
    """(label, adapter_config.json text)."""
    edits = {
        "peft_type=rst": {"peft_type": "rst"},
        "peft_type=Rst": {"peft_type": "Rst"},
        "peft_type=5": {"peft_type": 5},
        "peft_type=null": {"peft_type": None},
        "tau=str": {"tau": "1e-3"},
        "tau=-1": {"tau": -1},
        "tau=NaN": {"tau": math.nan},
        "tau_schedule=cosine": {"tau_schedule": "cosine"},
        "target_modules=(": {"target_modules": "("},
        "target_modules narrowed": {"target_modules": ["lin0"]},
        "target_modules regex narrowed": {"target_modules": r"lin\d"},
        "target_modules=nope": {"target_modules": ["nope"]},
        "target_modules=5": {"target_modules": 5},
        "exclude_modules=lin1": {"exclude_modules": ["lin1"]},
        "exclude_modules=(": {"exclude_modules": "("},
        "modules_to_save=5": {"modules_to_save": 5},
        "modules_to_save=str": {"modules_to_save": "head"},
        "modules_to_save=lin1": {"modules_to_save": ["lin1"]},
        "modules_to_save=[]": {"modules_to_save": []},
        "modules_to_save=null": {"modules_to_save": None},
        "check_base_fingerprint=str": {"check_base_fingerprint": "false"},
        "check_base_fingerprint=0": {"check_base_fingerprint": 0},
        "bias_only=str": {"bias_only": "yes"},
        "init_weights=str": {"init_weights": "no"},
        "inference_mode=str": {"inference_mode": "true"},
        "keep_ratio=2": {"keep_ratio": 2.0},
    }
    out = [(label, json.dumps({**config, **edit})) for label, edit in edits.items()]
    out.append(("peft_type missing", json.dumps({k: v for k, v in config.items() if k != "peft_type"})))
    out += [("empty", ""), ("null", "null"), ("list", "[]"), ("truncated", json.dumps(config)[:-3])]
    out += [("binary", "\x00\xff garbage")]
    return out


def test_fuzzed_adapters_are_refused_cleanly_or_load_exactly(tmp_path):
    rng = random.Random(SEED)
    model = get_peft_model(base_model(), RSTConfig(tau=1e-3, modules_to_save=["head"]))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        model(torch.randn(8, 4, generator=g)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    good = tmp_path / "good"
    model.save_pretrained(good)
    raw = (good / "adapter_model.safetensors").read_bytes()
    config_text = (good / "adapter_config.json").read_text()
    original = load_file(good / "adapter_model.safetensors")
    assert {k.rpartition(".")[2] for k in original} >= {"idx", "val", "weight", "bias", "rst_integrity"}
    # what the intact file gives through transformers: the same tensors without peft's prefix, and their record
    hf = hf_base_model()
    hf.load_adapter(good, adapter_name="new")
    as_saved_by_transformers = get_peft_model_state_dict(hf, adapter_name="new")
    record = peft_rst.format.INTEGRITY_KEY
    assert same_tensors(
        {k: v for k, v in as_saved_by_transformers.items() if k != record},
        {k.removeprefix("base_model.model."): v for k, v in original.items() if k != record},
    )

    cases = [(label, changed, data, config_text) for label, changed, data in byte_mutations(raw, rng)]
    cases += [(label, False, raw, text) for label, text in config_mutations(json.loads(config_text))]

    outcomes: Counter = Counter()
    silent, dirty = [], []
    for i, (label, changes_tensors, data, text) in enumerate(cases):
        folder = tmp_path / f"case{i}"
        folder.mkdir()
        (folder / "adapter_model.safetensors").write_bytes(data)
        (folder / "adapter_config.json").write_text(text)

        base = base_model()
        before = snapshot(base)
        try:
            loaded = PeftModel.from_pretrained(base, folder)
        except Exception:
            outcomes["from_pretrained refused"] += 1
            if differences(base, before):
                dirty.append((label, "from_pretrained", differences(base, before)))
        else:
            outcomes["from_pretrained loaded"] += 1
            if changes_tensors or not same_tensors(get_peft_model_state_dict(loaded), original):
                silent.append((label, "from_pretrained"))

        for name in ("default", "new"):
            host = PeftModel.from_pretrained(base_model(), good, is_trainable=True)
            before = snapshot(host)
            try:
                host.load_adapter(folder, adapter_name=name)
            except Exception:
                outcomes[f"load_adapter({name}) refused"] += 1
                if differences(host, before):
                    dirty.append((label, f"load_adapter({name})", differences(host, before)))
            else:
                outcomes[f"load_adapter({name}) loaded"] += 1
                if changes_tensors or not same_tensors(get_peft_model_state_dict(host, adapter_name=name), original):
                    silent.append((label, f"load_adapter({name})"))

        hf = hf_base_model()
        before = snapshot(hf)
        try:
            hf.load_adapter(folder, adapter_name="new")
        except Exception:
            outcomes["transformers load_adapter refused"] += 1
            if differences(hf, before):
                dirty.append((label, "transformers load_adapter", differences(hf, before)))
        else:
            outcomes["transformers load_adapter loaded"] += 1
            if changes_tensors or not same_tensors(
                get_peft_model_state_dict(hf, adapter_name="new"), as_saved_by_transformers
            ):
                silent.append((label, "transformers load_adapter"))

    print(f"{len(cases)} mutated folders, outcomes: {dict(outcomes)}")
    assert not silent, f"{len(silent)} silent accepts: {silent[:5]}"
    assert not dirty, f"{len(dirty)} refusals changed the model: {dirty[:5]}"
    assert outcomes["from_pretrained refused"] >= len(cases) - 25  # most mutations must be refused, not tolerated
