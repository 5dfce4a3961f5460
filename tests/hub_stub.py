"""A stand-in Hub endpoint on 127.0.0.1 for the real huggingface_hub client (DESIGN.md §4).

Implements what pushes call (whoami, repo creation, branch creation, YAML validation, preupload,
NDJSON commits with base64 files) and what downloads read (HEAD/GET `<repo>/resolve/<revision>/<file>`,
the file listing `api/models/<repo>/tree/<revision>`). Committed files land in `root/<owner>/<name>/<revision>/`,
so a test can load exactly what was pushed (a deleted file is listed in the commit as "-<path>"). The token the client sends is recorded, never written to disk.
`fail_commits`: the 1-based numbers of the commit attempts that fail (HTTP 507: a server failure huggingface_hub
does not retry itself, unlike 500 or a dropped connection, which it retries with backoff before failing).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubStub:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files"}
        self.tokens: set[str] = set()
        self.branches: set[tuple[str, str]] = set()
        self.fail_commits: set[int] = set()
        self.commit_attempts = 0
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, payload: object, status: int = 200) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _auth(self) -> None:
                header = self.headers.get("Authorization", "")
                if header.startswith("Bearer "):
                    stub.tokens.add(header[len("Bearer "):])

            def _resolve(self, send_body: bool) -> bool:
                """GET/HEAD /<repo>/resolve/<revision>/<path>: what downloads (from_pretrained) read."""
                match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", self.path.split("?")[0])
                if not match:
                    return False
                repo, revision, name = match.groups()
                path = stub.root / repo / revision / name
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return True
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Repo-Commit", hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest())
                self.end_headers()
                if send_body:
                    self.wfile.write(data)
                return True

            def do_HEAD(self):  # noqa: N802
                if not self._resolve(send_body=False):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def do_GET(self):  # noqa: N802
                self._auth()
                if self.path.startswith("/api/whoami-v2"):
                    return self._reply({"type": "user", "name": "tester", "orgs": [], "auth": {"accessToken": {"role": "write"}}})
                if self._resolve(send_body=True):
                    return
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/?]+)(\?.*)?", self.path)
                if match:
                    folder = stub.root / match.group(1) / match.group(2)
                    files = sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []
                    return self._reply([{"type": "file", "path": p.relative_to(folder).as_posix(), "size": p.stat().st_size,
                                         "oid": hashlib.sha1(p.read_bytes()).hexdigest()} for p in files])
                self._reply({"error": f"not implemented: GET {self.path}"}, 404)

            def do_POST(self):  # noqa: N802
                self._auth()
                body = self._body()
                base = f"http://{self.headers['Host']}"
                if self.path == "/api/repos/create":
                    data = json.loads(body or b"{}")
                    repo = f"{data.get('organization') or 'tester'}/{data['name']}"
                    return self._reply({"url": f"{base}/{repo}", "name": repo, "id": repo})
                if self.path == "/api/validate-yaml":
                    return self._reply({"errors": [], "warnings": []})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/branch/([^/?]+)", self.path)
                if match:
                    stub.branches.add((match.group(1), match.group(2)))
                    return self._reply({})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/preupload/([^/?]+)(\?.*)?", self.path)
                if match:
                    files = json.loads(body)["files"]
                    return self._reply({"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]})
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/commit/([^/?]+)(\?.*)?", self.path)
                if match:
                    stub.commit_attempts += 1
                    if stub.commit_attempts in stub.fail_commits:
                        return self._reply({"error": "stub: this commit fails"}, 507)
                    repo, revision = match.group(1), match.group(2)
                    summary, files = "", []
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item["key"] == "header":
                            summary = item["value"].get("summary", "")
                        elif item["key"] == "deletedFile":
                            (stub.root / repo / revision / item["value"]["path"]).unlink(missing_ok=True)
                            files.append(f"-{item['value']['path']}")
                        elif item["key"] == "file":
                            value = item["value"]
                            target = stub.root / repo / revision / value["path"]
                            target.parent.mkdir(parents=True, exist_ok=True)
                            target.write_bytes(base64.b64decode(value["content"]))
                            files.append(value["path"])
                    stub.commits.append({"repo": repo, "revision": revision, "summary": summary, "files": sorted(files)})
                    oid = f"{len(stub.commits):040x}"
                    return self._reply({"commitUrl": f"{base}/{repo}/commit/{oid}", "commitOid": oid, "success": True})
                self._reply({"error": f"not implemented: POST {self.path}"}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def folder(self, repo: str, revision: str = "main") -> Path:
        return self.root / repo / revision

    def __enter__(self) -> HubStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def use_local_hub(monkeypatch, hub: HubStub, home: Path, token: str | None = None) -> None:
    """Point this process's huggingface_hub at `hub` (online, its own HF_HOME under `home`)."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HOME", str(Path(home) / "hf_home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setattr(hub_constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
