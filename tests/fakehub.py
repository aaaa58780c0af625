"""A minimal Hugging Face Hub on 127.0.0.1, serving local folders as repos.

Only the network is faked: ``huggingface_hub`` runs its real download, cache and resume code against it. It
implements what ``snapshot_download`` asks for: repo info, the recursive tree listing, and ``resolve`` with HEAD,
GET and byte ranges. ``drop(file, after, times)`` makes the next ``times`` full GETs of a file send only
``after`` bytes and then drop the connection, to exercise retries and resuming.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self, repos: dict[str, Path], commit: str = "c0ffee" + "0" * 34) -> None:
        self.repos = repos
        self.commit = commit
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self._drops: dict[str, list[int]] = {}  # file -> [bytes sent before dropping, times left]
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def drop(self, name: str, after: int, times: int = 1) -> None:
        self._drops[name] = [after, times]

    def files(self, repo: str) -> list[str]:
        root = self.repos[repo]
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def _json(self, data: object, status: int = 200) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _not_found(self) -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _route(self) -> None:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Range")))
                info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if info and info.group(1) in hub.repos:
                    repo = info.group(1)
                    siblings = [{"rfilename": f} for f in hub.files(repo)]
                    return self._json({"id": repo, "modelId": repo, "sha": hub.commit, "siblings": siblings})
                if tree and tree.group(1) in hub.repos:
                    repo = tree.group(1)
                    entries = []
                    for name in hub.files(repo):
                        data = (hub.repos[repo] / name).read_bytes()
                        entries.append(
                            {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                        )
                    return self._json(entries)
                if resolve and resolve.group(1) in hub.repos:
                    return self._file(resolve.group(1), resolve.group(3))
                return self._not_found()

            def _file(self, repo: str, name: str) -> None:
                target = hub.repos[repo] / name
                if not target.is_file():
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("X-Repo-Commit", hub.commit)
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                data = target.read_bytes()
                start = 0
                ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if ranged:
                    start = int(ranged.group(1))
                body = data[start:]
                self.send_response(206 if ranged else 200)
                self.send_header("X-Repo-Commit", hub.commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(body)))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if self.command == "HEAD":
                    return None
                drop = hub._drops.get(name)
                if drop and drop[1] > 0 and not ranged:
                    drop[1] -= 1
                    self.wfile.write(body[: drop[0]])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return None
                self.wfile.write(body)
                return None

            do_GET = _route  # noqa: N815
            do_HEAD = _route  # noqa: N815

        return Handler
