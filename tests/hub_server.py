"""A Hugging Face Hub-compatible server on 127.0.0.1, for tests of pushing and pulling adapters.

`olah` (a test dependency, installed by `make install` into ``.venv-hub/``) serves the Hub's read
API from plain git repositories (``<root>/mirrors/models/<org>/<name>``): ``model_info`` with the
card's metadata, ``list_repo_files``, ``hf_hub_download``, ``snapshot_download``. It answers 405
to writes, so a small write layer sits in front of it and answers what a push sends:

* ``POST /api/repos/create``: a new git repository with HF's first commit (``.gitattributes``);
* ``POST /api/validate-yaml``: the README's front matter must parse;
* ``POST /api/{type}s/{repo}/preupload/{rev}``: every file is uploaded "regular" (in the commit);
* ``POST /api/{type}s/{repo}/commit/{rev}``: the NDJSON commit becomes a git commit;
* ``POST /api/{type}s/{repo}/branch/{branch}``: a new branch;
* ``GET /api/whoami-v2``.

Every request with a token must carry the server's token (else 401, like the Hub; the token is
never echoed); writes need it; private repositories are hidden (404) from requests without it.
``GET /api/models/{repo}`` is forwarded as ``.../revision/main`` (olah in offline mode resolves
an unnamed revision only from its cache). Everything else is forwarded to olah unchanged.

Run it by hand: ``python tests/hub_server.py ROOT --token hf_x`` prints the endpoint to use as
``HF_ENDPOINT``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml

ROOT = Path(__file__).resolve().parents[1]
_GIT_ENV = {"GIT_AUTHOR_NAME": "hub", "GIT_AUTHOR_EMAIL": "hub@localhost", "GIT_COMMITTER_NAME": "hub",
            "GIT_COMMITTER_EMAIL": "hub@localhost"}
_GITATTRIBUTES = "*.bin filter=lfs diff=lfs merge=lfs -text\n*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def find_olah() -> Path | None:
    """``olah-cli``: $ADAPTERCLI_OLAH, the repository's ``.venv-hub/`` (made by `make install`), or PATH."""
    for candidate in (os.environ.get("ADAPTERCLI_OLAH"), ROOT / ".venv-hub/bin/olah-cli", shutil.which("olah-cli")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class HubServer:
    """olah + the write layer, as one endpoint. ``with HubServer(root, token) as hub: hub.endpoint``."""

    def __init__(self, root: Path, token: str, olah: Path | None = None):
        self.root, self.token = Path(root), token
        self.olah_bin = olah or find_olah()
        if self.olah_bin is None:
            raise RuntimeError("olah-cli not found: run `make install` (it creates .venv-hub/ with olah)")
        self.mirrors = self.root / "mirrors"
        self.private: set[str] = set()
        self.lock = threading.Lock()
        self.port, self.olah_port = _free_port(), _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._olah: subprocess.Popen | None = None
        self._http: ThreadingHTTPServer | None = None

    def start(self) -> HubServer:
        for kind in ("models", "datasets"):
            (self.mirrors / kind).mkdir(parents=True, exist_ok=True)
        (self.root / "olah.toml").write_text(
            f'[basic]\nhost = "127.0.0.1"\nport = {self.olah_port}\nrepos-path = "{self.root / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\nmirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\nmetadata-cache-ttl = 0\n'
            "[accessibility]\noffline = true\n")
        self._log = open(self.root / "olah.log", "w")  # closed in stop()
        self._olah = subprocess.Popen([str(self.olah_bin), "-c", str(self.root / "olah.toml")], cwd=self.root,
                                      stdout=self._log, stderr=subprocess.STDOUT)
        handler = type("Handler", (_Handler,), {"hub": self})
        self._http = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        threading.Thread(target=self._http.serve_forever, daemon=True).start()
        try:
            _wait_for_port(self.olah_port, 30)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"olah did not start: {(self.root / 'olah.log').read_text()[-2000:]}") from None
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
            self._log.close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- git, one repository per Hub repository --------------------------------------------------
    def repo_path(self, kind: str, repo_id: str) -> Path:
        return self.mirrors / kind / repo_id

    def git(self, repo: Path, *args: str, input: bytes | None = None, env: dict | None = None) -> str:
        result = subprocess.run(["git", "--git-dir", str(repo), *args], input=input, capture_output=True,
                                env={**os.environ, **_GIT_ENV, **(env or {})}, check=True)
        return result.stdout.decode().strip()

    def create_repo(self, kind: str, repo_id: str, private: bool) -> bool:
        path = self.repo_path(kind, repo_id)
        if path.exists():
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch", "main", str(path)], check=True)
        self.commit(kind, repo_id, "main", "initial commit", {".gitattributes": _GITATTRIBUTES.encode()}, [])
        if private:
            self.private.add(f"{kind}/{repo_id}")
        return True

    def resolve(self, kind: str, repo_id: str, revision: str) -> str | None:
        try:
            return self.git(self.repo_path(kind, repo_id), "rev-parse", "--verify", "--quiet", f"{revision}^{{commit}}")
        except subprocess.CalledProcessError:
            return None

    def blob(self, kind: str, repo_id: str, revision: str, path: str) -> str | None:
        try:
            return self.git(self.repo_path(kind, repo_id), "rev-parse", "--verify", "--quiet", f"{revision}:{path}")
        except subprocess.CalledProcessError:
            return None

    def commit(self, kind: str, repo_id: str, branch: str, message: str, files: dict[str, bytes],
               deleted: list[str]) -> str:
        repo = self.repo_path(kind, repo_id)
        parent = self.resolve(kind, repo_id, branch)
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                self.git(repo, "read-tree", parent, env=env)
            for path in deleted:
                listed = self.git(repo, "ls-files", "--", path, env=env).splitlines()
                for name in listed:
                    self.git(repo, "update-index", "--force-remove", "--", name, env=env)
            for path, content in files.items():
                sha = self.git(repo, "hash-object", "-w", "--stdin", input=content)
                self.git(repo, "update-index", "--add", "--cacheinfo", f"100644,{sha},{path}", env=env)
            tree = self.git(repo, "write-tree", env=env)
        commit = self.git(repo, "commit-tree", tree, *(["-p", parent] if parent else []), "-m", message)
        self.git(repo, "update-ref", f"refs/heads/{branch}", commit, *([parent] if parent else []))
        return commit


def _repo_of(parts: list[str]) -> tuple[str, str, list[str]] | None:
    """(kind, repo id, rest) of ``api/models/org/name/...``, ``datasets/org/name/resolve/...`` or
    ``org/name/resolve/...``; None for other paths."""
    if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
        return parts[1], f"{parts[2]}/{parts[3]}", parts[4:]
    if len(parts) >= 4 and parts[0] == "datasets" and parts[3] == "resolve":
        return "datasets", f"{parts[1]}/{parts[2]}", parts[3:]
    if len(parts) >= 3 and parts[2] == "resolve":
        return "models", f"{parts[0]}/{parts[1]}", parts[2:]
    return None


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # keep test output clean
        pass

    def _reply(self, status: int, payload: dict | None = None, headers: dict | None = None, body: bytes = b"") -> None:
        if payload is not None:
            body = json.dumps(payload).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        self.send_response(status)
        merged = {"Content-Length": str(len(body))}
        for key, value in (headers or {}).items():  # a forwarded HEAD keeps olah's length
            merged["Content-Length" if key.lower() == "content-length" else key] = value
        for key, value in merged.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _authorised(self) -> bool | None:
        """True: the server's token; None: no token; False: another token (always refused)."""
        header = self.headers.get("Authorization")
        if not header:
            return None
        return header.removeprefix("Bearer ").strip() == self.hub.token

    def _handle(self) -> None:
        body = self._body()  # always read: on a kept-alive connection, an unread body would be the next request
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        auth = self._authorised()
        if auth is False:
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        located = _repo_of(parts)
        if located and f"{located[0]}/{located[1]}" in self.hub.private and not auth:
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if self.command == "POST":
            return self._write(parts, located, auth, body)
        if parts == ["api", "whoami-v2"]:
            if not auth:
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return self._reply(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})
        if located and parts[0] == "api" and not located[2]:
            self.path = f"/api/{located[0]}/{located[1]}/revision/main" + (f"?{url.query}" if url.query else "")
        self._forward(body)

    def _write(self, parts: list[str], located, auth: bool | None, body: bytes) -> None:
        if parts == ["api", "validate-yaml"]:
            content = json.loads(body).get("content", "")
            front = content.split("---")[1] if content.startswith("---") and content.count("---") >= 2 else ""
            try:
                yaml.safe_load(front)
            except yaml.YAMLError as error:
                return self._reply(400, {"errors": [{"message": f"invalid YAML: {error}"}]})
            return self._reply(200, {"errors": [], "warnings": []})
        if not auth:
            return self._reply(401, {"error": "You must be authenticated to write (pass a token)"})
        hub = self.hub
        if parts == ["api", "repos", "create"]:
            data = json.loads(body)
            kind = f"{data.get('type') or 'model'}s"
            repo_id = f"{data.get('organization') or 'tester'}/{data['name']}"
            private = data.get("visibility") == "private" or bool(data.get("private"))
            with hub.lock:
                created = hub.create_repo(kind, repo_id, private)
            if not created:
                return self._reply(409, {"error": "You already created this model repo", "url": ""})
            prefix = "" if kind == "models" else f"{kind}/"
            return self._reply(200, {"url": f"{hub.endpoint}/{prefix}{repo_id}", "name": repo_id})
        if not located or len(located[2]) < 2 or not hub.repo_path(located[0], located[1]).exists():
            return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        kind, repo_id, (action, revision, *_) = located
        if action == "preupload":
            files = json.loads(body)["files"]
            return self._reply(200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                 "oid": hub.blob(kind, repo_id, revision, f["path"])} for f in files]})
        if action == "branch":
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            with hub.lock:
                if hub.resolve(kind, repo_id, revision):
                    return self._reply(409, {"error": f"branch {revision} already exists"})
                hub.git(hub.repo_path(kind, repo_id), "update-ref", f"refs/heads/{revision}",
                        hub.resolve(kind, repo_id, start) or "")
            return self._reply(200, {})
        if action == "commit":
            return self._commit(kind, repo_id, revision, body)
        return self._reply(405, {"error": f"{action} is not supported by this test server"})

    def _commit(self, kind: str, repo_id: str, revision: str, body: bytes) -> None:
        hub, message, files, deleted = self.hub, "", {}, []
        for line in body.splitlines():
            item = json.loads(line)
            value = item["value"]
            if item["key"] == "header":
                message = "\n\n".join(p for p in (value.get("summary"), value.get("description")) if p)
            elif item["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif item["key"] in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"].rstrip("/"))
            else:
                return self._reply(400, {"error": f"{item['key']} operations are not supported by this test server"})
        with self.hub.lock:
            if not hub.resolve(kind, repo_id, revision):
                return self._reply(404, {"error": f"Invalid rev id: {revision}"}, {"X-Error-Code": "RevisionNotFound"})
            commit = hub.commit(kind, repo_id, revision, message or "upload", files, deleted)
        prefix = "" if kind == "models" else f"{kind}/"
        return self._reply(200, {"commitUrl": f"{hub.endpoint}/{prefix}{repo_id}/commit/{commit}",
                                 "commitOid": commit, "pullRequestUrl": None})

    def _forward(self, body: bytes) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", self.hub.olah_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        try:
            connection.request(self.command, self.path, body=body or None, headers=headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        skip = ("transfer-encoding", "connection", "keep-alive") + (() if self.command == "HEAD" else ("content-length",))
        self._reply(response.status, headers={k: v for k, v in response.getheaders() if k.lower() not in skip},
                    body=data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder for the git repositories and olah's files")
    parser.add_argument("--token", required=True, help="the token writes must carry")
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    with HubServer(args.root, args.token) as hub:
        print(f"HF_ENDPOINT={hub.endpoint}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    sys.exit(main())
