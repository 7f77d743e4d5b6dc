"""push_adapter_to_hub through the real huggingface_hub client against a local stand-in Hub endpoint.

The stand-in (an HTTP server on 127.0.0.1 in a thread) implements just what huggingface_hub 2.x calls for
create_repo, create_commit (README metadata validation, preupload, commit) and file download, and records every
request, so the tests check what the client sends and that `PeftModel.from_pretrained(base, repo_id)` loads back.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest
import torch
import yaml
from peft import PeftModel, get_peft_model
from torch import nn

import peft_rst  # noqa: F401  (registers RST with peft)
from peft_rst.hub import HubTokenError, push_adapter_to_hub

TOKEN = "hf_standin_test_token"
REPO = "tester/rst-art-clipart"
PAPER_TITLE = "Unsupervised Domain Adaption Harnessing Vision-Language Pre-training"


# ------------------------------------------------------------------------------------------------ stand-in Hub
class StandInHub(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}, "commits": [...]}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, authorization header)
        self.unexpected: list[str] = []
        self.telemetry: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: StandInHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _reply(self, status: int, payload=None, headers: dict | None = None, body: bytes | None = None) -> None:
        data = body if body is not None else (b"" if payload is None else json.dumps(payload).encode())
        self.send_response(status)
        for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._reply(401, {"error": "Invalid credentials in Authorization header"})
        return False

    def _record(self) -> str:
        path = unquote(urlsplit(self.path).path)
        self.server.requests.append((self.command, path, self.headers.get("Authorization")))
        return path

    def _unexpected(self, path: str) -> None:
        self.server.unexpected.append(f"{self.command} {path}")
        self._reply(404, {"error": f"stand-in does not implement {self.command} {path}"})

    def do_POST(self) -> None:
        path = self._record()
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        hub = self.server
        if path == "/api/validate-yaml":
            content = json.loads(body)["content"]
            try:
                yaml.safe_load(content.split("---")[1])
            except (IndexError, yaml.YAMLError) as err:
                return self._reply(400, {"errors": [{"message": str(err)}], "warnings": []})
            return self._reply(200, {"errors": [], "warnings": []})
        if not self._authorized():
            return None
        if path == "/api/repos/create":
            payload = json.loads(body)
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:
                return self._reply(
                    409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
                )
            hub.repos[repo_id] = {"private": payload.get("visibility") == "private", "files": {}, "commits": []}
            return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if match is None or match[1] not in hub.repos:
            return self._unexpected(path)
        repo = hub.repos[match[1]]
        if match[2] == "preupload":
            files = json.loads(body)["files"]
            # small files are plain git blobs on the Hub too: "regular" means their content comes with the commit
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in files]
            return self._reply(200, {"files": modes})
        lines = [json.loads(line) for line in body.decode().splitlines() if line]
        header = lines[0]["value"]
        added = {
            item["value"]["path"]: base64.b64decode(item["value"]["content"])
            for item in lines
            if item["key"] == "file"
        }
        oid = hashlib.sha1(body).hexdigest()
        repo["commits"].append(
            {"oid": oid, "message": header["summary"], "files": added, "keys": [x["key"] for x in lines]}
        )
        repo["files"].update(added)
        return self._reply(200, {"commitUrl": f"{hub.url}/{match[1]}/commit/{oid}", "commitOid": oid})

    def do_HEAD(self) -> None:
        self._download()

    def do_GET(self) -> None:
        if urlsplit(self.path).path == "/api/agent-harnesses":
            # huggingface_hub's best-effort user-agent telemetry; "not found" makes it fall back to no detection
            # (a success would be cached under the user's HF_HOME)
            self.server.telemetry.append(self.path)
            return self._reply(404, {"error": "not served by the stand-in"})
        self._download()

    def _download(self) -> None:
        path = self._record()
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if match is None:
            return self._unexpected(path)
        repo = self.server.repos.get(match[1])
        if repo is None or not repo["commits"]:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        commit = repo["commits"][-1]["oid"]
        content = repo["files"].get(match[3])
        if content is None:
            return self._reply(
                404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}
            )
        etag = f'"{hashlib.sha1(content).hexdigest()}"'
        headers = {"Content-Type": "application/octet-stream", "ETag": etag, "X-Repo-Commit": commit}
        return self._reply(200, headers=headers, body=content)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    from huggingface_hub import constants, hf_api

    server = StandInHub()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    # huggingface_hub reads HF_ENDPOINT at import; point its module-level defaults at the stand-in instead
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_api.api, "endpoint", server.url)  # the HfApi behind huggingface_hub.file_exists
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    assert not server.unexpected, f"requests the stand-in does not implement: {server.unexpected}"


# ------------------------------------------------------------------------------------------------ a trained adapter
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Linear(12, 12))
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.body(x).relu())


@pytest.fixture(scope="module")
def trained():
    """(pristine base copy, trained PeftModel, independent DSP count)."""
    torch.manual_seed(0)
    base = Net()
    pristine = copy.deepcopy(base)
    model = get_peft_model(base, peft_rst.RSTConfig(tau=1e-3, modules_to_save=["head"]))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    merged = copy.deepcopy(model).merge_and_unload()
    w0 = dict(pristine.named_parameters())
    changed = sum(
        int(torch.count_nonzero(p.detach() - w0[n].detach()))
        for n, p in merged.named_parameters()
        if n.startswith("body.")
    )
    head = sum(p.numel() for p in pristine.head.parameters())
    assert 0 < changed < sum(p.numel() for p in pristine.body.parameters())
    return pristine, model, changed + head


# ------------------------------------------------------------------------------------------------ tests
def test_missing_token_is_a_clear_error_and_sends_nothing(hub, trained, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubTokenError, match=r"HF_TOKEN.*hf auth login"):
        push_adapter_to_hub(trained[1], REPO, card_data={"source_domain": "Art"})
    assert hub.requests == []


def test_push_uploads_adapter_config_and_card_in_one_commit(hub, trained, tmp_path):
    _, model, dsp = trained
    card = {
        "source_domain": "Art",
        "target_domain": "Clipart",
        "dataset": "office_home",
        "accuracy": 0.8765,
        "base_model": "openai/clip-vit-base-patch16",
    }
    info = push_adapter_to_hub(model, REPO, card_data=card, private=True, commit_message="Art to Clipart")

    repo = hub.repos[REPO]
    assert repo["private"] is True
    assert len(repo["commits"]) == 1 and repo["commits"][0]["message"] == "Art to Clipart"
    assert info.oid == repo["commits"][0]["oid"]
    uploaded = repo["commits"][0]["files"]
    assert sorted(uploaded) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    writes = [(m, p) for m, p, auth in hub.requests if p != "/api/validate-yaml"]
    assert writes and all(auth == f"Bearer {TOKEN}" for m, p, auth in hub.requests if p != "/api/validate-yaml")

    # the adapter files are byte for byte what save_pretrained writes
    model.save_pretrained(tmp_path / "local")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert uploaded[name] == (tmp_path / "local" / name).read_bytes()

    text = uploaded["README.md"].decode()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "openai/clip-vit-base-patch16"
    assert {"rst", "domain-adaptation", "clip"} <= set(meta["tags"])
    assert meta["metrics"] == ["accuracy"]
    result = meta["model-index"][0]["results"][0]
    assert result["metrics"][0] == {"type": "accuracy", "value": 0.8765, "name": "Accuracy"}
    assert result["dataset"]["type"] == "office_home"
    disk = sum(len(uploaded[n]) for n in ("adapter_config.json", "adapter_model.safetensors"))
    assert f"| DSP (downstream parameters) | {dsp / 1e6:.4f} M ({dsp:,} entries) |" in text
    assert f"| Size on disk | {disk:,} bytes" in text
    assert "| Source → target | Art → Clipart |" in text
    assert "87.65 %" in text
    assert f'PeftModel.from_pretrained(base, "{REPO}")' in text
    assert PAPER_TITLE in text and "Zhou, Wenlve and Zhou, Zhiheng" in text
    assert "IEEE Transactions on Circuits and Systems for Video Technology" in text


def test_pushed_adapter_loads_back_from_the_hub(hub, trained):
    pristine, model, _ = trained
    push_adapter_to_hub(model, REPO, card_data={"source_domain": "Art", "target_domain": "Clipart"})
    loaded = PeftModel.from_pretrained(copy.deepcopy(pristine), REPO)

    x = torch.randn(5, 6)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    got = loaded.merge_and_unload().state_dict()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    downloads = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET"}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= downloads


def test_push_folder_sends_only_adapter_files_and_updates_existing_repo(hub, trained, tmp_path):
    _, model, _ = trained
    folder = tmp_path / "adapter"
    model.save_pretrained(folder)
    (folder / "optimizer.pt").write_bytes(b"not part of the adapter")
    (folder / "README.md").write_text("an old card")

    push_adapter_to_hub(folder, REPO, card_data={"target_domain": "Clipart"})
    push_adapter_to_hub(folder, REPO, card_data={"target_domain": "Product"}, commit_message="second")

    commits = hub.repos[REPO]["commits"]
    assert [c["message"] for c in commits] == ["Upload RST adapter", "second"]
    for commit in commits:
        assert sorted(commit["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
        assert commit["keys"] == ["header", "file", "file", "file"]
    assert "Product" in hub.repos[REPO]["files"]["README.md"].decode()
    assert (folder / "README.md").read_text() == "an old card"  # the user's folder is left as it was


def test_bad_inputs_fail_before_any_request(hub, trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved RST adapter"):
        push_adapter_to_hub(tmp_path, REPO)
    with pytest.raises(ValueError, match="fraction"):
        push_adapter_to_hub(trained[1], REPO, card_data={"accuracy": 87.7, "dataset": "office_home"})
    with pytest.raises(TypeError, match="Unknown model card field"):
        push_adapter_to_hub(trained[1], REPO, card_data={"acuracy": 0.8})
    assert hub.requests == []


def test_write_model_card_measures_the_adapter_and_writes_atomically(trained, tmp_path):
    from peft_rst.model_card import write_model_card

    _, model, dsp = trained
    model.save_pretrained(tmp_path)
    before = set(tmp_path.iterdir())
    card = write_model_card(tmp_path, source_domain="Real", target_domain="Art", dataset="office_home", accuracy=0.5)
    assert card == tmp_path / "README.md" and set(tmp_path.iterdir()) == before  # replaced peft's card, no temp left
    text = card.read_text()
    assert f"({dsp:,} entries)" in text and "| Reset threshold tau | 0.001 |" in text
    assert "# RST adapter: Real → Art (office_home)" in text
    with pytest.raises(TypeError, match="measures"):
        write_model_card(tmp_path, dsp=1)
    with pytest.raises(ValueError, match="needs dataset"):
        write_model_card(tmp_path, accuracy=0.5)
    assert card.read_text() == text  # failed renders leave the old card


def test_template_placeholders_are_checked(tmp_path):
    from peft_rst.model_card import render_model_card

    template = tmp_path / "t.md"
    template.write_text("---\n$front_matter\n---\n$title: $dsp_m M, costs $$5, $no_such_field\n")
    with pytest.raises(ValueError, match=r"\$no_such_field"):
        render_model_card(template, dsp=2_500_000)
    template.write_text("---\n$front_matter\n---\n$title: $dsp_m M, costs $$5\n")
    assert render_model_card(template, dsp=2_500_000).endswith("RST adapter: 2.5000 M, costs $5\n")
    with pytest.raises(FileNotFoundError, match="template"):
        render_model_card(tmp_path / "missing.md")
