"""A local stand-in for the Hugging Face Hub: the few HTTP endpoints that pushing and pulling an adapter use.

It runs the real ``huggingface_hub`` client code against an in-memory store of repos, refs and commits:

* ``POST /api/repos/create`` (409 when the repo exists), ``POST /api/models/{repo}/branch/{branch}`` (409 when
  the branch exists), ``GET /api/models/{repo}[/revision/{rev}]``;
* ``POST /api/models/{repo}/preupload/{rev}`` (every file is uploaded as a "regular" git blob, with the remote
  git oid so that unchanged files are skipped) and ``POST /api/models/{repo}/commit/{rev}`` (NDJSON);
* ``POST /api/models/{repo}/discussions`` and ``GET .../discussions/{num}`` (pull requests, ``refs/pr/{num}``);
* ``HEAD``/``GET /{repo}/resolve/{rev}/{path}`` with the headers ``hf_hub_download`` relies on (``ETag``,
  ``X-Repo-Commit``, ``Content-Length``) and the Hub's ``X-Error-Code`` on 404s;
* ``POST /api/validate-yaml`` (and ``GET /api/agent-harnesses``, an optional registry: answered as absent).

Private repos answer only to the token that created them (401 ``RepoNotFound`` otherwise, as the Hub does). Every
request is recorded in :attr:`HubStandIn.requests`; routes the stand-in does not serve are also listed in
:attr:`HubStandIn.unserved`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub uses as ETag of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    oid: str
    files: dict[str, bytes]
    summary: str
    description: str
    parent: str | None


@dataclass
class Repo:
    repo_id: str
    private: bool
    authorization: str | None  # the Authorization header of whoever created it
    refs: dict[str, str] = field(default_factory=dict)  # branch name or refs/pr/N -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    pull_requests: dict[int, dict] = field(default_factory=dict)

    def commit(self, ref: str, files: dict[str, bytes], summary: str, description: str = "") -> Commit:
        parent = self.refs.get(ref)
        digest = hashlib.sha1(f"{parent}\n{summary}\n{description}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\n".encode())
        new = Commit(digest.hexdigest(), dict(files), summary, description, parent)
        self.commits[new.oid] = new
        self.refs[ref] = new.oid
        return new

    def resolve(self, revision: str) -> Commit | None:
        oid = self.refs.get(revision, revision)
        return self.commits.get(oid)


@dataclass
class Request:
    method: str
    path: str  # unquoted path
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self):
        return json.loads(self.body)


class HubStandIn:
    """An in-memory Hub served over HTTP on 127.0.0.1 (``url``); ``start()``/``stop()`` run it in a thread."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.unserved: list[str] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self))
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="hub-standin", daemon=True)

    def start(self) -> HubStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the port (connections are not kept alive, so nothing answers afterwards)."""
        if self.server.fileno() != -1:
            self.server.shutdown()
            self.server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """The files of ``repo_id`` at ``revision`` (a branch, ``refs/pr/N`` or a commit oid)."""
        commit = self.repos[repo_id].resolve(revision)
        if commit is None:
            raise KeyError(f"{repo_id} has no revision {revision!r}")
        return commit.files

    def requests_to(self, method: str, path_part: str) -> list[Request]:
        """Recorded requests with this method whose path contains ``path_part``."""
        return [r for r in self.requests if r.method == method and path_part in r.path]


def _handler_class(hub: HubStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: a stopped stand-in really stops answering

        def log_message(self, format: str, *args) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            self._dispatch()

        def do_HEAD(self) -> None:
            self._dispatch()

        def do_POST(self) -> None:
            self._dispatch()

        # ---------------------------------------------------------------------------------------- plumbing
        def _dispatch(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            request = Request(self.command, unquote(split.path), parse_qs(split.query),
                              {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
            segments = [unquote(part) for part in split.path.strip("/").split("/")]
            with hub.lock:
                hub.requests.append(request)
                status, headers, body = self._route(request, segments)
            self.send_response(status)
            payload = body if isinstance(body, bytes) else json.dumps(body).encode()
            if not isinstance(body, bytes):
                headers = {"Content-Type": "application/json", **headers}
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _route(self, request: Request, seg: list[str]):
            method = request.method
            if method == "POST" and seg == ["api", "repos", "create"]:
                return self._create_repo(request)
            if method == "POST" and seg == ["api", "validate-yaml"]:
                return self._validate_yaml(request)
            if method == "GET" and seg == ["api", "agent-harnesses"]:  # an optional registry the client looks up
                return 404, {}, {"error": "Not found"}
            if len(seg) >= 4 and seg[:2] == ["api", "models"]:
                repo_id, rest = f"{seg[2]}/{seg[3]}", seg[4:]
                repo, denied = self._repo(request, repo_id)
                if denied:
                    return denied
                if method == "GET" and (rest == [] or (len(rest) == 2 and rest[0] == "revision")):
                    return self._model_info(repo, rest[1] if rest else "main")
                if method == "POST" and len(rest) == 2 and rest[0] == "branch":
                    return self._create_branch(request, repo, rest[1])
                if method == "POST" and len(rest) == 2 and rest[0] == "preupload":
                    return self._preupload(request, repo, rest[1])
                if method == "POST" and len(rest) == 2 and rest[0] == "commit":
                    return self._commit(request, repo, rest[1])
                if method == "POST" and rest == ["discussions"]:
                    return self._open_pull_request(request, repo)
                if method == "GET" and len(rest) == 2 and rest[0] == "discussions":
                    return 200, {}, repo.pull_requests[int(rest[1])]
            if method in ("GET", "HEAD") and len(seg) >= 5 and seg[2] == "resolve":
                repo, denied = self._repo(request, f"{seg[0]}/{seg[1]}")
                return denied or self._resolve(repo, seg[3], "/".join(seg[4:]), head=method == "HEAD")
            hub.unserved.append(f"{method} {request.path}")
            return 404, {}, {"error": f"the stand-in does not serve {method} {request.path}"}

        def _repo(self, request: Request, repo_id: str):
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and request.headers.get("authorization") != repo.authorization):
                return None, (401, {"X-Error-Code": "RepoNotFound"}, {"error": "Repository not found"})
            return repo, None

        # ---------------------------------------------------------------------------------------- endpoints
        def _create_repo(self, request: Request):
            body = request.json()
            repo_id = f"{body['organization']}/{body['name']}"
            if repo_id in hub.repos:
                return 409, {}, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"}
            # newer huggingface_hub releases send `visibility`, older ones `private`; the Hub takes either
            private = body.get("visibility") == "private" or body.get("private") is True
            repo = Repo(repo_id, private, request.headers.get("authorization"))
            repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                         "initial commit")
            hub.repos[repo_id] = repo
            return 200, {}, {"url": f"{hub.url}/{repo_id}", "name": repo_id}

        def _validate_yaml(self, request: Request):
            content = request.json()["content"]
            try:
                if content.startswith("---\n"):
                    yaml.safe_load(content.split("\n---", 1)[0][4:])
            except yaml.YAMLError as error:
                return 400, {}, {"errors": [{"message": str(error)}], "warnings": []}
            return 200, {}, {"errors": [], "warnings": []}

        def _model_info(self, repo: Repo, revision: str):
            commit = repo.resolve(revision)
            if commit is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
            return 200, {}, {"id": repo.repo_id, "modelId": repo.repo_id, "sha": commit.oid, "private": repo.private,
                             "siblings": [{"rfilename": path} for path in sorted(commit.files)]}

        def _create_branch(self, request: Request, repo: Repo, branch: str):
            if branch in repo.refs:
                return 409, {}, {"error": f"Reference already exists: refs/heads/{branch}"}
            start = repo.resolve((request.json() or {}).get("startingPoint") or "main")
            repo.refs[branch] = start.oid
            return 200, {}, {}

        def _preupload(self, request: Request, repo: Repo, revision: str):
            commit = repo.resolve(revision)
            if commit is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
            files = []
            for item in request.json()["files"]:
                current = commit.files.get(item["path"])
                files.append({"path": item["path"], "uploadMode": "regular", "shouldIgnore": False,
                              "oid": None if current is None else git_blob_oid(current)})
            return 200, {}, {"files": files, "commitOid": commit.oid}

        def _commit(self, request: Request, repo: Repo, revision: str):
            if request.query.get("create_pr") == ["1"]:
                number = self._new_pull_request(repo, "commit with create_pr", revision)
                revision = f"refs/pr/{number}"
            commit = repo.resolve(revision)
            if revision not in repo.refs or commit is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
            lines = [json.loads(line) for line in request.body.decode().splitlines() if line.strip()]
            header = next(line["value"] for line in lines if line["key"] == "header")
            if header.get("parentCommit") not in (None, commit.oid):
                return 412, {}, {"error": "A commit has happened since. Please refresh and try again."}
            files = dict(commit.files)
            for line in lines[1:]:
                value = line["value"]
                if line["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif line["key"] == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return 400, {}, {"error": f"the stand-in does not take {line['key']} operations"}
            new = repo.commit(revision, files, header["summary"], header.get("description", ""))
            pr_url = f"{hub.url}/{repo.repo_id}/discussions/{revision.rsplit('/', 1)[1]}" \
                if revision.startswith("refs/pr/") else None
            return 200, {}, {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{new.oid}", "commitOid": new.oid,
                             "pullRequestUrl": pr_url}

        def _open_pull_request(self, request: Request, repo: Repo):
            body = request.json()
            if not body.get("pullRequest"):
                return 400, {}, {"error": "the stand-in only opens pull requests"}
            number = self._new_pull_request(repo, body["title"], "main")
            return 200, {}, {"num": number, "url": f"{hub.url}/{repo.repo_id}/discussions/{number}"}

        def _new_pull_request(self, repo: Repo, title: str, base: str) -> int:
            number = len(repo.pull_requests) + 1
            repo.refs[f"refs/pr/{number}"] = repo.refs[base]
            repo.pull_requests[number] = {
                "title": title, "num": number, "author": {"name": "standin"}, "createdAt": "2025-01-01T00:00:00Z",
                "status": "draft", "repo": {"name": repo.repo_id, "type": "model"}, "isPullRequest": True,
                "events": [], "changes": {"base": f"refs/heads/{base}"}, "filesWithConflicts": [],
            }
            return number

        def _resolve(self, repo: Repo, revision: str, path: str, *, head: bool):
            commit = repo.resolve(revision)
            if commit is None:
                return 404, {"X-Error-Code": "RevisionNotFound"}, {"error": f"Invalid rev id: {revision}"}
            if path not in commit.files:
                return 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit.oid}, \
                    {"error": "Entry not found"}
            data = commit.files[path]
            headers = {"ETag": f'"{git_blob_oid(data)}"', "X-Repo-Commit": commit.oid,
                       "Content-Type": "application/octet-stream"}
            return 200, headers, data

    return Handler
