"""DSP report: counts checked against torch.count_nonzero(w - w0) computed here from trained models."""

from __future__ import annotations

import copy
import json
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

import peft_rst
from peft_rst.__main__ import main
from peft_rst.format import RSTFormatError
from peft_rst.report import report

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 12))
        self.head = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.body(x).relu())


def _train(seed: int, steps: int = 3):
    """(pristine base, trained PeftModel, {module: (numel, changed)} counted independently, head params)."""
    torch.manual_seed(seed)
    base = Net()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, peft_rst.RSTConfig(tau=1e-3, modules_to_save=["head"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(steps):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    merged = copy.deepcopy(model)
    merged.merge_adapter()  # the base layers now hold the adapted weights
    adapted = {n.replace(".base_layer", ""): p for n, p in merged.get_base_model().named_parameters()}
    modules = {}
    for name, w0 in pristine.named_parameters():
        if name.startswith("body."):
            module = name.rpartition(".")[0]
            numel, changed = modules.get(module, (0, 0))
            delta = adapted[name].detach() - w0.detach()
            modules[module] = (numel + w0.numel(), changed + int(torch.count_nonzero(delta)))
    head = sum(p.numel() for p in pristine.head.parameters())
    return pristine, model, modules, head


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    out = []
    for seed in (0, 1):
        pristine, model, modules, head = _train(seed)
        folder = tmp_path_factory.mktemp(f"adapter{seed}")
        model.save_pretrained(folder)
        out.append((folder, pristine, model, modules, head))
    return out


def _check_against_reference(result, modules, head):
    rows = {r.module: r for r in result.rows}
    assert sorted(rows) == sorted([*modules, "head"])
    for module, (numel, changed) in modules.items():
        assert rows[module].kind == "rst"
        assert (rows[module].numel, rows[module].changed) == (numel, changed)
    assert (rows["head"].kind, rows["head"].changed, rows["head"].numel) == ("head", head, head)
    assert sorted(rows["head"].parameters) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    changed = sum(c for _, c in modules.values())
    numel = sum(n for n, _ in modules.values())
    assert 0 < changed < numel, "training must change some entries and reset others for the test to mean anything"
    assert result.backbone_changed == changed and result.head_params == head
    assert result.dsp == changed + head
    assert result.dsp_m == pytest.approx((changed + head) / 1e6)
    assert result.density == pytest.approx(changed / numel)


def test_folder_report_matches_independent_count_and_file_sizes(adapters):
    folder, _, _, modules, head = adapters[0]
    result = report(folder).adapters[0]
    _check_against_reference(result, modules, head)
    assert result.tau == 1e-3
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    assert result.files == {
        "adapter_config.json": os.path.getsize(config),
        "adapter_model.safetensors": os.path.getsize(weights),
    }
    assert result.disk_nbytes == os.path.getsize(config) + os.path.getsize(weights)
    # safetensors layout: 8-byte header length, JSON header, then the tensor data the rows account for, and the
    # file's checksum record (not an adapter parameter)
    (header_len,) = struct.unpack("<Q", weights.read_bytes()[:8])
    start, end = json.loads(weights.read_bytes()[8 : 8 + header_len])["rst_integrity"]["data_offsets"]
    assert result.tensor_nbytes == os.path.getsize(weights) - 8 - header_len - (end - start)


def test_live_model_report_matches_independent_count_and_folder(adapters):
    folder, _, model, modules, head = adapters[0]
    live = report(model).adapters[0]
    _check_against_reference(live, modules, head)
    assert live.disk_nbytes is None and not live.files
    assert [r.to_dict() for r in live.rows] == [r.to_dict() for r in report(folder).adapters[0].rows]


def test_loaded_inference_adapter_reports_the_same(adapters):
    folder, pristine, _, modules, head = adapters[0]
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), folder)
    _check_against_reference(report(loaded).adapters[0], modules, head)


def test_sum_over_two_adapters(adapters):
    result = report([a[0] for a in adapters])
    expected = [sum(c for _, c in modules.values()) + head for *_, modules, head in adapters]
    assert [a.dsp for a in result.adapters] == expected
    assert result.dsp == sum(expected) and result.dsp_m == pytest.approx(sum(expected) / 1e6)
    sizes = sum(
        os.path.getsize(a[0] / n) for a in adapters for n in ("adapter_config.json", "adapter_model.safetensors")
    )
    assert result.disk_nbytes == sizes
    total = result.to_dict()["total"]
    assert (total["adapters"], total["dsp"], total["disk_nbytes"]) == (2, sum(expected), sizes)
    assert "sum (2 adapters)" in result.table()


def test_cli_table_in_process(adapters, capsys):
    (folder, *_, modules, head), (folder2, *_) = adapters
    assert main(["report", str(folder)]) == 0
    out = capsys.readouterr().out
    for module, (numel, changed) in modules.items():
        assert any(
            line.split()[:5] == [module, "rst", "bias,weight", f"{numel:,}", f"{changed:,}"]
            for line in out.splitlines()
        )
    dsp = sum(c for _, c in modules.values()) + head
    assert f"DSP: {dsp:,} = {dsp / 1e6:.4f} M" in out
    assert main(["report", str(folder), str(folder2)]) == 0
    sum_row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sum (2 adapters)")]
    assert len(sum_row) == 1
    assert main(["report", str(folder / "missing")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_json_subprocess(adapters):
    folders = [str(a[0]) for a in adapters]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "peft_rst", "report", *folders, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    for entry, (folder, _, _, modules, head) in zip(data["adapters"], adapters):
        assert entry["name"] == str(folder)
        assert entry["backbone_changed"] == sum(c for _, c in modules.values())
        assert entry["head_params"] == head
        by_module = {m["module"]: (m["numel"], m["changed"]) for m in entry["modules"] if m["kind"] == "rst"}
        assert by_module == modules
    assert data["total"]["dsp"] == sum(e["dsp"] for e in data["adapters"])


def test_refuses_merged_models_other_methods_and_corrupt_files(adapters, tmp_path):
    folder, pristine, model, _, _ = adapters[0]
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        report(merged)

    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_model.safetensors").write_bytes((folder / "adapter_model.safetensors").read_bytes())
    config = json.loads((folder / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="not an RST one"):
        report(lora)

    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text(json.dumps(config))
    data = bytearray((folder / "adapter_model.safetensors").read_bytes())
    data[-1] ^= 0x40  # flip one bit of the last tensor's data
    (corrupt / "adapter_model.safetensors").write_bytes(bytes(data))
    with pytest.raises(RSTFormatError):
        report(corrupt)

    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        report(tmp_path)
    with pytest.raises(TypeError, match="PeftModel"):
        report(pristine)


class Embed(nn.Module):
    """Owns a bare parameter and has children, like CLIP's vision embeddings (wrapped, with wrapped children)."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(6))
        self.proj = nn.Linear(6, 6)

    def forward(self, x):
        return self.proj(x) + self.cls


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = Embed()
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.embed(x))


def test_nested_rst_layers_are_reported_under_the_models_module_names(tmp_path):
    torch.manual_seed(3)
    base = Nested()
    w0 = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_peft_model(base, peft_rst.RSTConfig(tau=1e-3, modules_to_save=["head"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.2)
    for _ in range(2):
        model(torch.randn(4, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    merged = copy.deepcopy(model)
    merged.merge_adapter()
    adapted = {n.replace(".base_layer", ""): p for n, p in merged.get_base_model().named_parameters()}
    expected = {
        "embed": (6, int(torch.count_nonzero(adapted["embed.cls"] - w0["embed.cls"]))),
        "embed.proj": (
            42,
            sum(
                int(torch.count_nonzero(adapted[f"embed.proj.{p}"] - w0[f"embed.proj.{p}"]))
                for p in ("weight", "bias")
            ),
        ),
    }
    model.save_pretrained(tmp_path)
    for result in (report(model).adapters[0], report(tmp_path).adapters[0]):
        rows = {r.module: (r.numel, r.changed) for r in result.rows if r.kind == "rst"}
        assert rows == expected
    assert sum(c for _, c in expected.values()) > 0


# ---------------------------------------------------------------------------------------------------------------
# issue 9 items 3 and 12: bad input is a one-line error, a closed pipe is not an error


def _copy_folder(src, dst, *, weights: bytes | None = None, config: str | None = None):
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else (src / "adapter_model.safetensors").read_bytes()
    )
    (dst / "adapter_config.json").write_text(
        config if config is not None else (src / "adapter_config.json").read_text()
    )
    return dst


def _two_d_index(folder, dst):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith(".idx") and tensors[k].numel() % 2 == 0)
    tensors[key] = tensors[key].reshape(2, -1)
    del tensors["rst_integrity"]
    tensors["rst_integrity"] = peft_rst.format.integrity_record(
        tensors
    )  # consistent checksums: the shape is the error
    dst.mkdir()
    save_file(tensors, dst / "adapter_model.safetensors")
    (dst / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    return dst


@pytest.mark.parametrize(
    "make, pattern",
    [
        (lambda f, d: _copy_folder(f, d, weights=b""), r"cannot be read as safetensors.*empty, truncated"),
        (
            lambda f, d: _copy_folder(f, d, weights=(f / "adapter_model.safetensors").read_bytes()[:-100]),
            r"cannot be read as safetensors",
        ),
        (lambda f, d: _copy_folder(f, d, weights=b"\x10" + b"\x00" * 7 + b"{garbage"), r"cannot be read"),
        (lambda f, d: _copy_folder(f, d, config="[]"), r"adapter_config\.json' must hold a JSON object.*got list"),
        (
            lambda f, d: _copy_folder(
                f, d, config=json.dumps({**json.loads((f / "adapter_config.json").read_text()), "modules_to_save": 5})
            ),
            r"'modules_to_save' must be a list of module names, got 5",
        ),
        (
            lambda f, d: (f / "adapter_model.safetensors").parent / "README.md",
            r"is a file; expected an adapter folder",
        ),
        (_two_d_index, r"\.idx'.* got torch\.uint8 of shape \(2, \d+\)"),
    ],
    ids=["zero-byte", "truncated", "corrupt-header", "config-list", "modules_to_save-int", "a-file", "2d-index"],
)
def test_cli_bad_input_is_one_line_error_without_traceback(adapters, tmp_path, capsys, make, pattern):
    folder = adapters[0][0]
    path = make(folder, tmp_path / "bad")
    if path.name == "README.md":
        path.write_text("not an adapter")
    assert main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    assert re.search(pattern, err), err


def test_cli_stops_quietly_when_the_reader_closes_the_pipe(adapters):
    """`peft-rst report ... | head -3`: no "error: [Errno 32] Broken pipe", no traceback."""
    folder = str(adapters[0][0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with subprocess.Popen(
        [sys.executable, "-m", "peft_rst", "report", "--json", *[folder] * 300],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        first = proc.stdout.readline()
        proc.stdout.close()  # like `head -1` exiting: the report is larger than the pipe buffer
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=300)
    assert first.strip() == b"{"
    assert err == "", err
    assert code == 1
