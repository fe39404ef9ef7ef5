"""A tiny Hugging Face Hub look-alike for tests, written with the standard library only.

The real ``huggingface_hub`` client (and ``transformers``' ``push_to_hub`` / ``from_pretrained``)
can push to and pull from it on 127.0.0.1. Repositories live in memory: for each repo a list of
commits (sha = 40 hex digits), each with the full file tree at that commit, and a ``main`` branch
pointing at the newest one.

Routes (checked against huggingface_hub 2.4 / transformers 5.24):

==========================================================  ==========================================
``POST /api/repos/create``                                  create; 409 if it exists (``exist_ok`` is
                                                            handled by the client on 409)
``DELETE /api/repos/delete``                                delete
``POST /api/validate-yaml``                                 README metadata check (always valid)
``GET  /api/whoami-v2``                                     token check (``HfApi().whoami()``)
``GET  /api/agent-harnesses``                               empty registry (huggingface_hub's user-agent
                                                            code fetches it unless telemetry is off)
``POST /api/{type}s/{repo}/preupload/{rev}``                every file ``"uploadMode": "regular"``, so
                                                            contents are inlined base64 in the commit
                                                            (no LFS, no Xet)
``POST /api/{type}s/{repo}/commit/{rev}``                   NDJSON ``header`` / ``file`` /
                                                            ``deletedFile`` / ``deletedFolder``
``GET  /api/{type}s/{repo}[/revision/{rev}]``               repo info: id, sha, siblings
``GET  /api/{type}s/{repo}/tree/{rev}[/{path}]``            ``list_repo_files`` / ``list_repo_tree``
``POST /api/{type}s/{repo}/paths-info/{rev}``               ``get_paths_info``
``GET  /api/{type}s/{repo}/commits/{rev}``                  ``list_repo_commits``
``GET  /api/{type}s/{repo}/refs``                           ``list_repo_refs``
``POST /api/{type}s/{repo}/branch/{branch}``                ``create_branch`` (``push_to_hub(revision=)``)
``GET|HEAD /[{type}s/]{repo}/resolve/{rev}/{path}``         file bytes with ``X-Repo-Commit``, ``ETag``
                                                            (git blob sha1), ``Content-Length``; honours
                                                            ``Range: bytes=N-[M]``
==========================================================  ==========================================

404s carry ``X-Error-Code: RepoNotFound`` / ``RevisionNotFound`` / ``EntryNotFound`` as the client
expects. Anything else is answered 404 and recorded in ``LocalHub.unhandled`` so tests can assert
that the client called nothing unexpected.

Authorization: the value of each request's ``Authorization`` header is kept in memory only
(``LocalHub.authorizations``) so tests can assert that a token was sent; it is never logged or
written anywhere. With ``token="..."`` the write routes also refuse (401) requests without
``Authorization: Bearer <token>``.

Failure simulation: with ``fail_with=<status>`` every write route (repos/create, repos/delete,
validate-yaml, preupload, commit, branch) answers that status; with ``fail_repos={"user/x", ...}``
as well, only writes to those repos fail (validate-yaml then never fails). Both are plain attributes
that may be changed while the server runs (``hub.fail_with = 507``), e.g. to let ``create_repo``
succeed and make the upload fail.

Beware of client retries. huggingface_hub 2.4 retries 408/429/500/502/503/504 on the preupload and
commit routes (``http_backoff``: 5 retries, sleeping 1+2+4+8+8 = 23 s) and has no environment
variable or setting to shorten that. ``create_repo`` and ``validate-yaml`` are plain POSTs that are
never retried, so with ``fail_with=500`` a ``push_to_hub`` / ``create_repo`` + ``upload_folder``
flow fails at once (``HfHubHTTPError``, status 500) on its first call, ``create_repo``. To make a
write to an *existing* repo (preupload/commit) fail fast, use a 5xx status that the client does not
retry: ``fail_with=507`` (Insufficient Storage) or ``501``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

REPO_TYPES = ("model", "dataset", "space")
# Hub clients retry these with backoff (huggingface_hub.utils._http._DEFAULT_RETRY_ON_STATUS_CODES).
CLIENT_RETRIED_STATUSES = (408, 429, 500, 502, 503, 504)


def git_blob_sha1(data: bytes) -> str:
    """The git blob id of ``data`` (what the Hub uses as ETag / oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    sha: str
    parent: str | None
    title: str
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    commits: list[Commit] = field(default_factory=list)  # oldest first
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit sha

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision)
        if sha is None and revision.startswith("refs/heads/"):
            sha = self.branches.get(revision[len("refs/heads/") :])
        if sha is None:
            sha = revision
        for commit in reversed(self.commits):
            if commit.sha == sha or (len(sha) >= 7 and commit.sha.startswith(sha)):
                return commit
        return None


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class LocalHub:
    """In-memory Hub server on 127.0.0.1 (port chosen by the OS), served from a background thread.

    >>> with LocalHub() as hub:
    ...     env = {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_fake"}  # set before importing huggingface_hub
    """

    def __init__(
        self,
        *,
        fail_with: int | None = None,
        fail_repos: Collection[str] | None = None,
        token: str | None = None,
        username: str = "user",
    ):
        self.fail_with = fail_with
        self.fail_repos = None if fail_repos is None else set(fail_repos)
        self.token = token
        self.username = username
        self.repos: dict[tuple[str, str], Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path with query)
        self.authorizations: list[str | None] = []  # Authorization header of each request, in memory only
        self.unhandled: list[tuple[str, str]] = []  # requests no route matched (answered 404)
        self.internal_errors: list[str] = []  # bugs in this server (answered 400, never retried)
        self._lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="LocalHub", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("LocalHub is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------------ helpers for tests

    def get_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        return self.repos[(repo_type, repo_id)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (path -> bytes)."""
        commit = self.get_repo(repo_id, repo_type).resolve(revision)
        if commit is None:
            raise KeyError(revision)
        return dict(commit.files)

    def add_repo(self, repo_id: str, files: dict[str, bytes] | None = None, repo_type: str = "model") -> Repo:
        """Create a repo directly (with an initial commit holding ``files``, as the Hub does)."""
        with self._lock:
            repo = Repo(repo_type=repo_type, repo_id=repo_id)
            self.repos[(repo_type, repo_id)] = repo
            initial = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
            self._new_commit(repo, "main", "initial commit", "", {**initial, **(files or {})})
            return repo

    def _new_commit(
        self, repo: Repo, branch: str, title: str, message: str, files: dict[str, bytes]
    ) -> Commit:
        parent = repo.branches.get(branch)
        digest = hashlib.sha1()
        digest.update(
            f"{repo.repo_type}/{repo.repo_id}\0{parent}\0{title}\0{message}\0{len(repo.commits)}".encode()
        )
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_sha1(files[path]).encode())
        commit = Commit(digest.hexdigest(), parent, title, message, dict(files), _now())
        repo.commits.append(commit)
        repo.branches[branch] = commit.sha
        return commit


def _repo_url_prefix(repo_type: str) -> str:
    return "" if repo_type == "model" else f"{repo_type}s/"


class _Handler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server_version = "LocalHub/1.0"

    # Never print request lines (or anything else) to stderr.
    def log_message(self, format, *args):  # noqa: A002
        pass

    # ------------------------------------------------------------------ plumbing

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        content_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if content_length is None else content_length))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers)

    def _error(self, err: HubError) -> None:
        headers = {"X-Error-Message": err.message}
        if err.error_code:
            headers["X-Error-Code"] = err.error_code
        self._json(err.status, {"error": err.message, **err.extra}, headers)

    def _dispatch(self, method: str) -> None:
        hub = self.hub
        body = self._read_body()
        with hub._lock:
            hub.requests.append((method, self.path))
            hub.authorizations.append(self.headers.get("Authorization"))
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        segments = [unquote(s) for s in split.path.split("/")[1:]]
        try:
            handled = self._route(method, segments, query, body)
        except HubError as err:
            self._error(err)
            return
        except Exception as err:  # a bug in this test server: answer 400 (not retried by the client)
            message = f"LocalHub internal error on {method} {split.path}: {type(err).__name__}: {err}"
            with hub._lock:
                hub.internal_errors.append(message)
            self._error(HubError(400, message))
            return
        if not handled:
            with hub._lock:
                hub.unhandled.append((method, self.path))
            self._error(HubError(404, f"LocalHub: no route for {method} {split.path}"))

    # ------------------------------------------------------------------ checks

    def _check_write(self, repo_id: str | None) -> None:
        hub = self.hub
        if hub.fail_with is not None and (hub.fail_repos is None or repo_id in hub.fail_repos):
            raise HubError(hub.fail_with, f"LocalHub configured to fail with {hub.fail_with}")
        if hub.token is not None and self.headers.get("Authorization") != f"Bearer {hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_type: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "Invalid rev id: " + revision, "RevisionNotFound")
        return commit

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, seg: list[str], query: dict[str, str], body: bytes) -> bool:
        hub = self.hub
        if seg[:1] == ["api"]:
            rest = seg[1:]
            if method == "POST" and rest == ["repos", "create"]:
                return self._create_repo(body)
            if method == "DELETE" and rest == ["repos", "delete"]:
                return self._delete_repo(body)
            if method == "POST" and rest == ["validate-yaml"]:
                self._check_write(None)
                self._json(200, {"errors": [], "warnings": []})
                return True
            if method == "GET" and rest == ["whoami-v2"]:
                return self._whoami()
            if method == "GET" and rest == ["agent-harnesses"]:
                # Fetched by huggingface_hub's user-agent code unless HF_HUB_DISABLE_TELEMETRY=1.
                self._json(200, {"standardEnvVars": [], "harnesses": {}})
                return True
            if len(rest) >= 3 and rest[0] in ("models", "datasets", "spaces"):
                repo_type = rest[0][:-1]
                repo_id = f"{rest[1]}/{rest[2]}"
                return self._repo_api(method, repo_type, repo_id, rest[3:], query, body)
            return False
        # File downloads: /{repo}/resolve/{rev}/{path} (models), /datasets/{repo}/resolve/... etc.
        repo_type = "model"
        if seg and seg[0] in ("datasets", "spaces") and len(seg) > 4 and seg[3] == "resolve":
            repo_type, seg = seg[0][:-1], seg[1:]
        if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
            with hub._lock:
                repo = self._repo(repo_type, f"{seg[0]}/{seg[1]}")
                commit = self._commit(repo, seg[3])
            return self._serve_file(commit, "/".join(seg[4:]))
        return False

    def _repo_api(self, method, repo_type, repo_id, rest, query, body) -> bool:
        hub = self.hub
        if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, rest[1] if rest else "main")
                self._json(200, self._repo_info(repo, commit))
            return True
        if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
            self._check_write(repo_id)
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = repo.resolve(rest[1])
                existing = commit.files if commit is not None else {}
            files = json.loads(body or b"{}").get("files", [])
            answer = []
            for f in files:
                entry = {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                if f["path"] in existing:
                    entry["oid"] = git_blob_sha1(existing[f["path"]])
                answer.append(entry)
            self._json(200, {"files": answer, "commitOid": commit.sha if commit else None})
            return True
        if method == "POST" and len(rest) == 2 and rest[0] == "commit":
            self._check_write(repo_id)
            return self._create_commit(repo_type, repo_id, rest[1], query, body)
        if method == "POST" and len(rest) == 2 and rest[0] == "branch":
            self._check_write(repo_id)
            payload = json.loads(body or b"{}")
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                if rest[1] in repo.branches:
                    raise HubError(409, "Reference already exists")
                start = self._commit(repo, payload.get("startingPoint") or "main")
                repo.branches[rest[1]] = start.sha
            self._json(200, {})
            return True
        if method == "GET" and len(rest) >= 2 and rest[0] == "tree":
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, rest[1])
            prefix = "/".join(rest[2:]).strip("/")
            recursive = query.get("recursive", "false").lower() in ("1", "true")
            entries = self._tree(commit, prefix, recursive)
            if entries is None:
                raise HubError(404, f"Entry not found: {prefix}", "EntryNotFound")
            self._json(200, entries)
            return True
        if method == "POST" and len(rest) == 2 and rest[0] == "paths-info":
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, rest[1])
            form = parse_qs(body.decode())
            paths = form.get("paths", [])
            if not paths and body.strip().startswith(b"{"):
                paths = json.loads(body).get("paths", [])
            result = []
            all_entries = self._tree(commit, "", True) or []
            for entry in all_entries:
                if entry["path"] in {p.strip("/") for p in paths}:
                    result.append(entry)
            self._json(200, result)
            return True
        if method == "GET" and len(rest) == 2 and rest[0] == "commits":
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                commit = self._commit(repo, rest[1])
                by_sha = {c.sha: c for c in repo.commits}
            history = []
            while commit is not None:
                history.append(
                    {
                        "id": commit.sha,
                        "title": commit.title,
                        "message": commit.message,
                        "authors": [{"user": hub.username}],
                        "date": commit.date,
                    }
                )
                commit = by_sha.get(commit.parent) if commit.parent else None
            self._json(200, history)
            return True
        if method == "GET" and rest == ["refs"]:
            with hub._lock:
                repo = self._repo(repo_type, repo_id)
                branches = [
                    {"name": b, "ref": f"refs/heads/{b}", "targetCommit": sha}
                    for b, sha in repo.branches.items()
                ]
            self._json(200, {"branches": branches, "converts": [], "tags": []})
            return True
        return False

    # ------------------------------------------------------------------ handlers

    def _whoami(self) -> bool:
        hub = self.hub
        auth = self.headers.get("Authorization")
        if not auth or (hub.token is not None and auth != f"Bearer {hub.token}"):
            raise HubError(401, "Invalid credentials in Authorization header")
        self._json(
            200,
            {
                "type": "user",
                "id": "0" * 24,
                "name": hub.username,
                "fullname": hub.username,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            },
        )
        return True

    def _create_repo(self, body: bytes) -> bool:
        hub = self.hub
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.username}/{payload['name']}"
        self._check_write(repo_id)
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type}")
        url = f"{hub.url}/{_repo_url_prefix(repo_type)}{repo_id}"
        with hub._lock:
            if (repo_type, repo_id) in hub.repos:
                # The client reads `url` from the 409 body when `exist_ok=True`.
                raise HubError(409, "You already created this model repo", extra={"url": url})
            repo = hub.add_repo(repo_id, repo_type=repo_type)
            repo.private = bool(payload.get("private")) or payload.get("visibility") == "private"
        self._json(200, {"url": url, "name": repo_id, "id": repo_id})
        return True

    def _delete_repo(self, body: bytes) -> bool:
        hub = self.hub
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or hub.username}/{payload['name']}"
        self._check_write(repo_id)
        with hub._lock:
            self._repo(repo_type, repo_id)
            del hub.repos[(repo_type, repo_id)]
        self._json(200, {})
        return True

    def _create_commit(self, repo_type, repo_id, revision, query, body) -> bool:
        hub = self.hub
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((item["value"] for item in lines if item["key"] == "header"), {})
        with hub._lock:
            repo = self._repo(repo_type, repo_id)
            if revision not in repo.branches:
                raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            head = self._commit(repo, revision)
            parent = header.get("parentCommit")
            if parent and parent != head.sha:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = dict(head.files)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise HubError(400, f"Unsupported encoding {value.get('encoding')}")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    if value["path"] not in files:
                        raise HubError(404, "A file with this name doesn't exist", "EntryNotFound")
                    del files[value["path"]]
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for path in [p for p in files if p.startswith(prefix)]:
                        del files[path]
                elif key in ("lfsFile", "deletedEntry"):
                    raise HubError(400, f"LocalHub does not support '{key}' (preupload answers 'regular')")
                elif key != "header":
                    raise HubError(400, f"Unknown commit operation '{key}'")
            commit = hub._new_commit(
                repo, revision, header.get("summary", ""), header.get("description", ""), files
            )
        prefix = f"{hub.url}/{_repo_url_prefix(repo_type)}{repo_id}"
        self._json(
            200,
            {
                "success": True,
                "commitOid": commit.sha,
                "commitUrl": f"{prefix}/commit/{commit.sha}",
                "pullRequestUrl": None,
                "hookOutput": "",
            },
        )
        return True

    def _repo_info(self, repo: Repo, commit: Commit) -> dict:
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": commit.date,
            "createdAt": repo.commits[0].date,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    @staticmethod
    def _tree(commit: Commit, prefix: str, recursive: bool) -> list[dict] | None:
        base = prefix + "/" if prefix else ""
        files = {p: d for p, d in commit.files.items() if p.startswith(base)}
        if prefix and not files:
            return None
        entries: dict[str, dict] = {}
        for path, data in sorted(files.items()):
            rel_parts = path[len(base) :].split("/")
            # folders on the way
            for depth in range(1, len(rel_parts)):
                if not recursive and depth > 1:
                    break
                folder = base + "/".join(rel_parts[:depth])
                if folder not in entries:
                    entries[folder] = {
                        "type": "directory",
                        "path": folder,
                        "oid": hashlib.sha1(f"tree {folder} {commit.sha}".encode()).hexdigest(),
                    }
            if recursive or len(rel_parts) == 1:
                entries[path] = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
        return list(entries.values())

    def _serve_file(self, commit: Commit, path: str) -> bool:
        data = commit.files.get(path)
        if data is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        etag = git_blob_sha1(data)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{etag}"',
            "Accept-Ranges": "bytes",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        status, payload = 200, data
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes="):
            first, _, last = rng[len("bytes=") :].split(",")[0].partition("-")
            if first:
                start = int(first)
                end = int(last) if last else len(data) - 1
            else:  # suffix range: last N bytes
                start, end = max(0, len(data) - int(last)), len(data) - 1
            if start >= len(data) and len(data) > 0:
                raise HubError(416, "Requested range not satisfiable")
            end = min(end, len(data) - 1)
            payload = data[start : end + 1]
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self._send(status, payload, headers, content_type="application/octet-stream")
        return True
