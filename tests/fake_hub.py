"""A small Hugging Face Hub on 127.0.0.1 for tests: the part of the Hub HTTP API that
huggingface_hub's upload and download paths call, with repos, branches, tags and commits kept
in memory. No network beyond the loopback interface.

Served routes (what huggingface_hub 2.x sends):

    POST /api/repos/create                              create_repo
    GET  /api/models/{repo}[/revision/{rev}]            repo_info / model_info (sha, siblings)
    GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree / list_repo_files
    POST /api/models/{repo}/branch/{branch}             create_branch
    POST /api/models/{repo}/tag/{rev}                   create_tag
    POST /api/models/{repo}/preupload/{rev}             upload mode per file: "regular" or "lfs"
    POST /{repo}.git/info/lfs/objects/batch             LFS batch API (basic transfer)
    PUT  /lfs/upload/{oid}, POST /lfs/verify            LFS upload + verify
    POST /api/models/{repo}/commit/{rev}                NDJSON commit (file, lfsFile, deletedFile, deletedFolder)
    POST /api/validate-yaml                             README.md metadata check
    HEAD/GET /{repo}/resolve/{rev}/{path}               file download: ETag, X-Repo-Commit, Content-Length
                                                        (LFS files: sha256 etag, X-Linked-Etag / X-Linked-Size)

Uploads take the LFS path only with xet disabled (``HF_HUB_DISABLE_XET=1``): huggingface_hub 2.x
uploads every "lfs" file through the xet protocol whenever ``hf_xet`` is installed.

``FakeHub.deny`` maps a route kind ("create", "preupload", "commit", "lfs", "branch") to an HTTP
status (401/403) answered instead, to test missing write permission.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

LFS_THRESHOLD = 4096  # bytes; the Hub's real rule (10 MB or binary) would keep these tiny files regular
MAX_BODY = 256 << 20


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    lfs_paths: dict[str, set[str]] = field(default_factory=dict)  # sha -> paths stored in LFS


class FakeHub:
    """In-memory Hub state plus a threaded HTTP server. Use as a context manager."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}  # sha256 -> content
        self.deny: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)

    # -- state helpers (tests read them directly) ----------------------------------------------------
    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[self.resolve(repo, rev)])

    def resolve(self, repo: Repo, rev: str) -> str | None:
        if rev in repo.refs:
            return repo.refs[rev]
        return rev if rev in repo.commits else None

    def new_commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], lfs: set[str]) -> str:
        sha = hashlib.sha1(f"{parent}-{time.time_ns()}-{sorted(files)}".encode()).hexdigest()
        repo.commits[sha] = files
        repo.lfs_paths[sha] = lfs
        return sha


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = 30  # seconds per socket read: a stuck client cannot hold a thread forever

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        # -- plumbing ------------------------------------------------------------------------------
        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict[str, str] | None = None,
            content_type: str = "application/json",
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj).encode(), headers)

        def _error(self, status: int, message: str, code: str | None = None) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.data

        def _denied(self, kind: str, repo_id: str) -> bool:
            status = hub.deny.get(kind)
            if status is None:
                return False
            self._error(status, f"You don't have the rights to write to {repo_id}")
            return True

        def _repo(self, repo_id: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
            return repo

        def _rev(self, repo: Repo, rev: str) -> str | None:
            sha = hub.resolve(repo, rev)
            if sha is None:
                self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            return sha

        def _dispatch(self) -> None:
            hub.requests.append((self.command, self.path, self.headers.get("Authorization")))
            n = int(self.headers.get("Content-Length") or 0)
            if n > MAX_BODY:
                self.close_connection = True
                return self._error(413, "body too large")
            self.data = self.rfile.read(n) if n else b""  # read it all: keep-alive connections stay in sync
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            with hub.lock:
                self._route(parts, query)

        do_GET = do_POST = do_PUT = do_HEAD = lambda self: self._dispatch()  # noqa: E731

        # -- routes --------------------------------------------------------------------------------
        def _route(self, p: list[str], query: dict) -> None:
            m = self.command
            if m == "POST" and p == ["api", "repos", "create"]:
                return self._create(json.loads(self._body()))
            if m == "POST" and p == ["api", "validate-yaml"]:
                self._body()
                return self._json(200, {"errors": [], "warnings": []})
            if p[:2] == ["api", "models"] and len(p) >= 4:
                repo_id, rest = "/".join(p[2:4]), p[4:]
                return self._api_repo(m, repo_id, rest, query)
            if m == "POST" and len(p) == 6 and p[1].endswith(".git") and p[2:] == ["info", "lfs", "objects", "batch"]:
                return self._lfs_batch(f"{p[0]}/{p[1][:-4]}", json.loads(self._body()))
            if m == "PUT" and p[:2] == ["lfs", "upload"] and len(p) == 3:
                data = self._body()
                if hashlib.sha256(data).hexdigest() != p[2]:
                    return self._error(400, "sha256 mismatch")
                hub.lfs[p[2]] = data
                return self._send(200)
            if m == "POST" and p == ["lfs", "verify"]:
                obj = json.loads(self._body())
                ok = obj.get("oid") in hub.lfs and len(hub.lfs[obj["oid"]]) == obj.get("size")
                return self._json(200 if ok else 404, {"ok": ok})
            if m in ("GET", "HEAD") and len(p) >= 5 and p[2] == "resolve":
                return self._resolve("/".join(p[:2]), p[3], "/".join(p[4:]))
            return self._error(404, f"no route for {m} {self.path}")

        def _create(self, payload: dict) -> None:
            repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if self._denied("create", repo_id):
                return
            if repo_id in hub.repos:  # the Hub's 409 names the existing repo's url
                return self._json(
                    409,
                    {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                    {"X-Error-Message": "You already created this model repo"},
                )
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            sha = hub.new_commit(
                repo, None, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}, set()
            )
            repo.refs["main"] = sha
            hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _api_repo(self, m: str, repo_id: str, rest: list[str], query: dict) -> None:
            if (
                m == "POST"
                and rest[:1] in (["preupload"], ["commit"], ["branch"], ["tag"])
                and self._denied(rest[0], repo_id)
            ):
                return
            repo = self._repo(repo_id)
            if repo is None:
                return
            if m == "GET" and rest[:1] in ([], ["revision"]):
                sha = self._rev(repo, "/".join(rest[1:]) if rest else "main")
                if sha:
                    files = repo.commits[sha]
                    self._json(
                        200,
                        {
                            "id": repo_id,
                            "modelId": repo_id,
                            "sha": sha,
                            "private": repo.private,
                            "siblings": [{"rfilename": f} for f in sorted(files)],
                        },
                    )
                return
            if m == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                sha = self._rev(repo, rest[1])
                if sha:
                    prefix = "/".join(rest[2:])
                    entries = [
                        self._tree_entry(repo, sha, path, data)
                        for path, data in sorted(repo.commits[sha].items())
                        if not prefix or path.startswith(prefix + "/")
                    ]
                    if query.get("recursive", ["false"])[0].lower() != "true":
                        entries = [e for e in entries if "/" not in e["path"][len(prefix) + 1 if prefix else 0 :]]
                    self._json(200, entries)
                return
            if m == "POST" and rest[:1] in (["branch"], ["tag"]) and len(rest) >= 2:
                body = json.loads(self._body() or b"{}")
                if rest[0] == "branch":
                    name, start = "/".join(rest[1:]), body.get("startingPoint") or "main"
                else:
                    name, start = body["tag"], "/".join(rest[1:])
                if name in repo.refs:
                    return self._error(409, f"Reference {name} already exists")
                sha = self._rev(repo, start)
                if sha:
                    repo.refs[name] = sha
                    self._json(200, {})
                return
            if m == "POST" and rest[:1] == ["preupload"]:
                files = json.loads(self._body())["files"]
                out = [
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if f["size"] >= LFS_THRESHOLD else "regular",
                        "shouldIgnore": False,
                    }
                    for f in files
                ]
                return self._json(200, {"files": out})
            if m == "POST" and rest[:1] == ["commit"] and len(rest) >= 2:
                return self._commit(repo_id, repo, "/".join(rest[1:]), self._body(), "create_pr" in query)
            self._error(404, f"no route for {m} {self.path}")

        def _tree_entry(self, repo: Repo, sha: str, path: str, data: bytes) -> dict:
            entry = {"type": "file", "path": path, "size": len(data), "oid": git_blob_sha1(data)}
            if path in repo.lfs_paths[sha]:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            return entry

        def _lfs_batch(self, repo_id: str, payload: dict) -> None:
            if self._denied("lfs", repo_id) or self._repo(repo_id) is None:
                return
            objects = []
            for o in payload["objects"]:
                obj = {"oid": o["oid"], "size": o["size"], "authenticated": True}
                if o["oid"] not in hub.lfs:
                    obj["actions"] = {
                        "upload": {"href": f"{hub.url}/lfs/upload/{o['oid']}"},
                        "verify": {"href": f"{hub.url}/lfs/verify"},
                    }
                objects.append(obj)
            self._json(200, {"transfer": "basic", "objects": objects})

        def _commit(self, repo_id: str, repo: Repo, rev: str, body: bytes, create_pr: bool = False) -> None:
            if rev not in repo.refs:
                return self._error(404, f"Invalid rev id: {rev}", "RevisionNotFound")
            parent = repo.refs[rev]
            pr = None
            if create_pr:  # the commit goes to a new refs/pr/N branch off rev, as the Hub does
                pr = 1 + sum(r.startswith("refs/pr/") for r in repo.refs)
                rev = f"refs/pr/{pr}"
                repo.refs[rev] = parent
            files = dict(repo.commits[parent])
            lfs = set(repo.lfs_paths[parent])
            for line in body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                    lfs.discard(value["path"])
                elif key == "lfsFile":
                    if value["oid"] not in hub.lfs:
                        return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                    files[value["path"]] = hub.lfs[value["oid"]]
                    lfs.add(value["path"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key == "deletedFolder":
                    files = {k: v for k, v in files.items() if not k.startswith(value["path"].rstrip("/") + "/")}
            sha = hub.new_commit(repo, parent, files, lfs & set(files))
            repo.refs[rev] = sha
            url = f"{hub.url}/{repo_id}/discussions/{pr}" if pr else None
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": url})

        def _resolve(self, repo_id: str, rev: str, path: str) -> None:
            repo = self._repo(repo_id)
            if repo is None:
                return
            sha = self._rev(repo, rev)
            if sha is None:
                return
            files = repo.commits[sha]
            if path not in files:
                return self._error(404, f"Entry {path} not found", "EntryNotFound")
            data = files[path]
            if path in repo.lfs_paths[sha]:  # LFS files: the etag is the content's sha256
                oid = hashlib.sha256(data).hexdigest()
                return self._send_file(
                    data,
                    {
                        "ETag": f'"{oid}"',
                        "X-Linked-Etag": f'"{oid}"',
                        "X-Linked-Size": str(len(data)),
                        "X-Repo-Commit": sha,
                    },
                )
            self._send_file(data, {"ETag": f'"{git_blob_sha1(data)}"', "X-Repo-Commit": sha})

        def _send_file(self, data: bytes, headers: dict[str, str]) -> None:
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes=") and self.command == "GET":
                start = int(rng[6:].split("-")[0] or 0)
                return self._send(
                    206,
                    data[start:],
                    {**headers, "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"},
                    content_type="application/octet-stream",
                )
            self._send(200, data, headers, content_type="application/octet-stream")

    return Handler
