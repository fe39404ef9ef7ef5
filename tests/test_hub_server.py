"""The real huggingface_hub / transformers clients against tests/hub_server.LocalHub.

huggingface_hub and transformers read HF_ENDPOINT / HF_TOKEN when they are imported, so each test
runs its client steps in one fresh Python subprocess (env set before import) that prints one JSON
line of results; the server runs in this process, so the tests also look at what it stored.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import LocalHub, git_blob_sha1  # noqa: E402

FAKE_TOKEN = "hf_localhub_fake_token_123"


@pytest.fixture
def local_hub():
    with LocalHub() as hub:
        yield hub


def hub_env(hub: LocalHub, hf_home: Path) -> dict[str, str]:
    """Environment for a client process talking to ``hub`` (no HF_HUB_OFFLINE, fresh HF_HOME)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_")) and k != "XDG_CACHE_HOME"
    }
    env.update(
        HF_ENDPOINT=hub.url,
        HF_TOKEN=FAKE_TOKEN,
        HF_HOME=str(hf_home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def run_client(hub: LocalHub, tmp_path: Path, script: str, *args: str, timeout: float = 120) -> dict:
    """Run ``script`` in a fresh interpreter against ``hub``; return the JSON it prints last."""
    script_path = tmp_path / "client.py"
    script_path.write_text(textwrap.dedent(script))
    proc = subprocess.run(
        [sys.executable, str(script_path), *args],
        env=hub_env(hub, tmp_path / "hf_home"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"client failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


HUB_CLIENT = """
    import json, sys, time
    from pathlib import Path
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    folder = Path(sys.argv[1])
    api = HfApi()
    out = {"whoami": api.whoami()["name"]}
    url = api.create_repo("user/demo")
    out["repo_url"], out["repo_id"] = str(url), url.repo_id
    out["exist_ok_url"] = str(api.create_repo("user/demo", exist_ok=True))
    try:
        api.create_repo("user/demo")
    except HfHubHTTPError as e:
        out["create_again"] = e.response.status_code

    info = api.upload_folder(folder_path=folder, repo_id="user/demo", commit_message="add files")
    out["commit_oid"], out["commit_url"] = info.oid, info.commit_url
    out["same_bytes"] = {
        name: Path(hf_hub_download("user/demo", name)).read_bytes() == (folder / name).read_bytes()
        for name in ("notes.txt", "weights/blob.bin")
    }
    out["files"] = sorted(api.list_repo_files("user/demo"))
    out["info_sha"] = api.model_info("user/demo").sha
    # an unchanged upload makes no new commit
    out["reupload_oid"] = api.upload_folder(folder_path=folder, repo_id="user/demo").oid

    errors = {}
    for name, call in {
        "missing_file": lambda: hf_hub_download("user/demo", "nope.txt"),
        "missing_repo": lambda: api.model_info("user/nope"),
        "missing_revision": lambda: hf_hub_download("user/demo", "notes.txt", revision="0" * 40),
    }.items():
        try:
            call()
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError) as e:
            errors[name] = type(e).__name__
    out["errors"] = errors

    # user/refused exists but the server refuses writes to it with a non-retried 507
    t0 = time.monotonic()
    try:
        api.upload_folder(folder_path=folder, repo_id="user/refused")
    except HfHubHTTPError as e:
        out["refused_status"] = e.response.status_code
    out["refused_seconds"] = time.monotonic() - t0
    print(json.dumps(out))
"""


def test_hub_client_roundtrip(tmp_path):
    folder = tmp_path / "upload"
    (folder / "weights").mkdir(parents=True)
    text = "héllo hub ✓\nsecond line\n".encode()
    blob = bytes(range(256)) * 8 + b"\x00\xff\x00"
    (folder / "notes.txt").write_bytes(text)
    (folder / "weights" / "blob.bin").write_bytes(blob)

    with LocalHub(fail_with=507, fail_repos={"user/refused"}) as hub:
        hub.add_repo("user/refused")
        out = run_client(hub, tmp_path, HUB_CLIENT, str(folder))

        assert out["whoami"] == "user"
        assert out["repo_url"] == f"{hub.url}/user/demo" and out["repo_id"] == "user/demo"
        assert out["exist_ok_url"] == out["repo_url"]
        assert out["create_again"] == 409
        repo = hub.get_repo("user/demo")
        assert out["commit_oid"] == repo.branches["main"] == out["info_sha"] == out["reupload_oid"]
        assert out["commit_url"] == f"{hub.url}/user/demo/commit/{out['commit_oid']}"
        assert len(repo.commits) == 2  # initial commit + upload; the unchanged re-upload made none
        assert out["same_bytes"] == {"notes.txt": True, "weights/blob.bin": True}
        assert out["files"] == [".gitattributes", "notes.txt", "weights/blob.bin"]
        stored = hub.files("user/demo")
        assert stored["notes.txt"] == text and stored["weights/blob.bin"] == blob
        assert out["errors"] == {
            "missing_file": "RemoteEntryNotFoundError",
            "missing_repo": "RepositoryNotFoundError",
            "missing_revision": "RevisionNotFoundError",
        }
        assert out["refused_status"] == 507 and out["refused_seconds"] < 5
        assert set(hub.files("user/refused")) == {".gitattributes"}
        # the token reached the server on every request; nothing unexpected was called
        assert set(hub.authorizations) == {f"Bearer {FAKE_TOKEN}"}
        assert hub.unhandled == [] and hub.internal_errors == []
        assert ("POST", "/api/models/user/demo/preupload/main") in hub.requests


TRANSFORMERS_CLIENT = """
    import json, time
    import torch
    from huggingface_hub.errors import HfHubHTTPError
    from transformers import AutoModelForImageClassification, ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, num_labels=3)
    model = ResNetForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(pixel_values=x).logits
    out = {"commit_url": model.push_to_hub("user/tiny")}
    loaded = AutoModelForImageClassification.from_pretrained("user/tiny").eval()
    with torch.no_grad():
        after = loaded(pixel_values=x).logits
    out["loaded_class"] = type(loaded).__name__
    out["identical_logits"] = torch.equal(before, after)
    out["logits"] = after.tolist()

    # the server answers 500 to every write on user/refused: create_repo (never retried) fails at once
    t0 = time.monotonic()
    try:
        model.push_to_hub("user/refused")
    except HfHubHTTPError as e:
        out["refused_status"] = e.response.status_code
    out["refused_seconds"] = time.monotonic() - t0
    print(json.dumps(out))
"""


def test_transformers_push_to_hub_and_from_pretrained(tmp_path):
    with LocalHub(fail_with=500, fail_repos={"user/refused"}) as hub:
        out = run_client(hub, tmp_path, TRANSFORMERS_CLIENT)

        assert out["identical_logits"], out
        assert out["loaded_class"] == "ResNetForImageClassification"
        assert len(out["logits"]) == 2 and len(out["logits"][0]) == 3
        files = hub.files("user/tiny")
        assert {"config.json", "model.safetensors", "README.md"} <= set(files)
        assert json.loads(files["config.json"])["hidden_sizes"] == [8, 16]
        assert out["commit_url"].endswith(hub.get_repo("user/tiny").branches["main"])
        assert out["refused_status"] == 500 and out["refused_seconds"] < 5
        assert ("model", "user/refused") not in hub.repos
        assert set(hub.authorizations) == {f"Bearer {FAKE_TOKEN}"}
        assert hub.unhandled == [] and hub.internal_errors == []


def test_server_basics_without_client(local_hub):
    """Fast checks of headers, ranges and failure modes with urllib (no Hub client import)."""
    import urllib.error
    import urllib.request

    hub = local_hub
    hub.add_repo("org/model", {"a/b.txt": b"0123456789"})
    sha = hub.get_repo("org/model").branches["main"]

    req = urllib.request.Request(f"{hub.url}/org/model/resolve/main/a/b.txt", method="HEAD")
    with urllib.request.urlopen(req) as resp:
        assert resp.headers["X-Repo-Commit"] == sha
        assert resp.headers["ETag"] == f'"{git_blob_sha1(b"0123456789")}"'
        assert resp.headers["Content-Length"] == "10"
    req = urllib.request.Request(f"{hub.url}/org/model/resolve/{sha}/a/b.txt", headers={"Range": "bytes=3-"})
    with urllib.request.urlopen(req) as resp:
        assert resp.status == 206 and resp.read() == b"3456789"

    for path, code in [
        ("/org/model/resolve/main/zz", "EntryNotFound"),
        ("/org/none/resolve/main/x", "RepoNotFound"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{hub.url}{path}")
        assert err.value.code == 404 and err.value.headers["X-Error-Code"] == code

    hub.fail_with = 503
    req = urllib.request.Request(
        f"{hub.url}/api/repos/create",
        data=json.dumps({"name": "x"}).encode(),
        method="POST",
        headers={"Authorization": "Bearer secret", "Content-Type": "application/json"},
    )
    t0 = time.monotonic()
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req)
    assert err.value.code == 503 and time.monotonic() - t0 < 2
    assert hub.authorizations[-1] == "Bearer secret"
    assert ("model", "user/x") not in hub.repos
