"""A GitLab REST API v4 emulator: the subset python-gitlab calls for the balance saga.

Each project is a real bare git repository under the data directory. Implemented:

    GET  /api/v4/user
    GET  /api/v4/projects/:id                                  (id or url-encoded path)
    GET  /api/v4/projects/:id/repository/files/:path[?ref=]    (base64 content)
    GET  /api/v4/projects/:id/repository/files/:path/raw
    GET  /api/v4/projects/:id/repository/branches[/:branch]     (?search=: term, ^term, term$)
    POST /api/v4/projects/:id/repository/branches               (branch, ref)
    GET  /api/v4/projects/:id/repository/tree[?path=&ref=]      (one directory, paginated)
    GET  /api/v4/projects/:id/repository/commits[?ref_name=]    and  /commits/:sha
    POST /api/v4/projects/:id/repository/commits                (branch, start_branch, actions)
    GET  /api/v4/issues[?assignee_username=&state=]   GET /api/v4/projects/:id/issues
    GET  /api/v4/projects/:id/merge_requests[?source_branch=&state=]
    POST /api/v4/projects/:id/merge_requests                    (409 when one is already open)

GitLab's status codes and error bodies (`{"message": "404 Project Not Found"}`, 401 for a
missing or wrong `PRIVATE-TOKEN`, 400 with `{"error": ...}` for a missing parameter).

Test hooks under /_emulator (no token): `POST /_emulator/projects {"path", "files", "default_branch"}`,
`POST /_emulator/issues {"project", "title", "assignee"}`, `POST|DELETE /_emulator/faults`
(`{"faults": [{"method", "path", "kind": "error|hang|hang_after", "status", "seconds", "times"}]}`),
`GET /_emulator/stats` (requests served, commits created per project).

    python -m emulators.gitlab --port 8010 --data ./data/gitlab --token dev-token
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import threading
import time
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from flask import Flask, jsonify, request
from werkzeug.http import HTTP_STATUS_CODES
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from emulators import effects
from sagas.balance.repository import GitError, GitRepo, NameClash

log = logging.getLogger(__name__)


class GitLabError(Exception):
    def __init__(self, status: int, message: Any, key: str = "message") -> None:
        super().__init__(str(message))
        self.status = status
        self.body = {key: message}


def not_found(what: str) -> GitLabError:
    return GitLabError(404, f"404 {what} Not Found")


class GitLabState:
    """Projects, issues, merge requests and fault plans; projects' files live in git."""

    def __init__(self, data_dir: Path, tokens: dict[str, str]) -> None:
        self.data = Path(data_dir)
        self.data.mkdir(parents=True, exist_ok=True)
        self.tokens = tokens  # token -> username
        self.lock = threading.RLock()
        self.meta_file = self.data / "emulator.json"
        meta = json.loads(self.meta_file.read_text()) if self.meta_file.exists() else {}
        self.projects: dict[str, dict[str, Any]] = meta.get("projects", {})  # id -> project
        self.issues: list[dict[str, Any]] = meta.get("issues", [])
        self.mrs: list[dict[str, Any]] = meta.get("merge_requests", [])
        self.faults: list[dict[str, Any]] = []
        self.requests = 0
        self.commits: dict[str, int] = {}

    def save(self) -> None:
        self.meta_file.write_text(json.dumps({"projects": self.projects, "issues": self.issues,
                                              "merge_requests": self.mrs}, indent=1))

    def find_project(self, ident: str) -> dict[str, Any]:
        p = self.projects.get(ident) or next((p for p in self.projects.values()
                                              if p["path_with_namespace"] == ident), None)
        if p is None:
            raise not_found("Project")
        return p

    def repo(self, project: dict[str, Any]) -> GitRepo:
        return GitRepo(self.data / f"{project['path_with_namespace']}.git")

    def create_project(self, path: str, files: dict[str, str], default_branch: str = "main") -> dict[str, Any]:
        with self.lock:
            for p in self.projects.values():
                if p["path_with_namespace"] == path:
                    return p
            pid = str(max((int(i) for i in self.projects), default=0) + 1)
            repo = GitRepo.init(self.data / f"{path}.git", default_branch)
            if files:
                repo.commit(default_branch, dict(files), "Initial commit\n")
            project = {"id": int(pid), "name": path.rsplit("/", 1)[-1], "path": path.rsplit("/", 1)[-1],
                       "path_with_namespace": path, "default_branch": default_branch}
            self.projects[pid] = project
            self.save()
            return project


def _project_json(p: dict[str, Any], base: str) -> dict[str, Any]:
    return {**p, "name_with_namespace": p["path_with_namespace"].replace("/", " / "),
            "namespace": {"full_path": p["path_with_namespace"].rsplit("/", 1)[0]},
            "http_url_to_repo": f"{base}/{p['path_with_namespace']}.git",
            "web_url": f"{base}/{p['path_with_namespace']}", "visibility": "private"}


def _commit_json(c: dict[str, str], base: str, p: dict[str, Any], parents: list[str] | None = None) -> dict[str, Any]:
    title = c["message"].split("\n", 1)[0]
    return {"id": c["id"], "short_id": c["id"][:8], "title": title, "message": c["message"],
            "author_name": c["author_name"], "author_email": c["author_email"],
            "authored_date": c["created_at"], "committer_name": c["author_name"],
            "committer_email": c["author_email"], "committed_date": c["created_at"],
            "created_at": c["created_at"], "parent_ids": parents or [],
            "web_url": f"{base}/{p['path_with_namespace']}/-/commit/{c['id']}"}


def create_app(data_dir: Path, tokens: dict[str, str]) -> Flask:
    app = Flask(__name__)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    state = GitLabState(data_dir, tokens)
    app.config["STATE"] = state

    def base() -> str:
        return request.host_url.rstrip("/")

    def body() -> dict[str, Any]:
        if request.is_json:
            data = request.get_json(silent=True)
            if not isinstance(data, dict):
                raise GitLabError(400, "400 Bad request - body is not a JSON object")
            return data
        return dict(request.form)

    def param(data: dict[str, Any], name: str) -> Any:
        value = data.get(name)
        if value in (None, ""):
            raise GitLabError(400, f"{name} is missing", key="error")
        return value

    def apply_fault(method: str, path: str) -> dict[str, Any] | None:
        with state.lock:
            for f in state.faults:
                if f.get("method", method).upper() != method or f.get("path", "") not in path:
                    continue
                if f.get("times", 1) <= 0:
                    continue
                f["times"] = f.get("times", 1) - 1
                return dict(f)
        return None

    @app.errorhandler(GitLabError)
    def _gitlab_error(exc: GitLabError) -> Any:
        return jsonify(exc.body), exc.status

    @app.post("/_emulator/projects")
    def _create_project() -> Any:
        data = request.get_json(force=True)
        p = state.create_project(data["path"], data.get("files") or {}, data.get("default_branch", "main"))
        return jsonify(_project_json(p, base())), 201

    @app.post("/_emulator/issues")
    def _create_issue() -> Any:
        data = request.get_json(force=True)
        with state.lock:
            p = state.find_project(str(data["project"]))
            iid = 1 + max((i["iid"] for i in state.issues if i["project_id"] == p["id"]), default=0)
            user = {"id": zlib.crc32(data["assignee"].encode()) % 100000, "username": data["assignee"],
                    "name": data["assignee"]}
            issue = {"id": len(state.issues) + 1, "iid": iid, "project_id": p["id"], "title": data["title"],
                     "description": data.get("description", ""), "state": data.get("state", "opened"),
                     "labels": data.get("labels", []), "assignee": user, "assignees": [user],
                     "web_url": f"{base()}/{p['path_with_namespace']}/-/issues/{iid}"}
            state.issues.append(issue)
            state.save()
        return jsonify(issue), 201

    @app.post("/_emulator/faults")
    def _set_faults() -> Any:
        with state.lock:
            state.faults = list((request.get_json(force=True) or {}).get("faults") or [])
        return {"faults": state.faults}

    @app.delete("/_emulator/faults")
    def _clear_faults() -> Any:
        with state.lock:
            state.faults = []
        return {"faults": []}

    @app.get("/_emulator/stats")
    def _stats() -> Any:
        with state.lock:
            return {"requests": state.requests, "commits": dict(state.commits),
                    "faults_left": [f for f in state.faults if f.get("times", 1) > 0]}

    @app.route("/api/v4/<path:_rest>", methods=["GET", "POST", "PUT", "DELETE"])
    def api(_rest: str) -> Any:
        raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI") or request.full_path
        path = urlsplit(raw).path.removeprefix("/api/v4/")
        with state.lock:
            state.requests += 1
        fault = apply_fault(request.method, unquote(path))
        if fault and fault.get("kind", "error") == "error":
            status = int(fault.get("status", 500))
            reason = HTTP_STATUS_CODES.get(status, "Error")
            return jsonify({"message": fault.get("message", f"{status} {reason}")}), status
        if fault and fault.get("kind") == "hang":
            time.sleep(float(fault.get("seconds", 5)))
        token = request.headers.get("PRIVATE-TOKEN") or request.headers.get("Authorization", "").removeprefix("Bearer ")
        user = state.tokens.get(token or "")
        if user is None:
            return jsonify({"message": "401 Unauthorized"}), 401
        segments = [unquote(s) for s in path.split("/")]
        result = route(segments, user)
        if fault and fault.get("kind") == "hang_after":
            time.sleep(float(fault.get("seconds", 5)))  # done, but the answer comes late (or never)
        return result

    def route(seg: list[str], user: str) -> Any:
        m = request.method
        if seg == ["user"] and m == "GET":
            return {"id": 1, "username": user, "name": user, "state": "active"}
        if seg == ["issues"] and m == "GET":
            return list_issues(None)
        if len(seg) < 2 or seg[0] != "projects":
            raise GitLabError(404, "404 Not Found", key="error")
        p = state.find_project(seg[1])
        rest = seg[2:]
        if not rest and m == "GET":
            return _project_json(p, base())
        if rest == ["issues"] and m == "GET":
            return list_issues(p["id"])
        if rest == ["merge_requests"]:
            return merge_requests(p)
        if rest[:2] == ["repository", "files"] and len(rest) >= 3 and m == "GET":
            raw = rest[-1] == "raw" and len(rest) >= 4
            file_path = "/".join(rest[2:-1] if raw else rest[2:])
            return get_file(p, file_path, raw)
        if rest[:2] == ["repository", "branches"]:
            return branches(p, "/".join(rest[2:]) or None)
        if rest == ["repository", "tree"] and m == "GET":
            return tree(p)
        if rest[:2] == ["repository", "commits"]:
            return commits(p, rest[2] if len(rest) > 2 else None)
        raise GitLabError(404, "404 Not Found", key="error")

    def list_issues(project_id: int | None) -> Any:
        assignee = request.args.get("assignee_username")
        wanted_state = request.args.get("state", "all")
        out = [i for i in state.issues
               if (project_id is None or i["project_id"] == project_id)
               and (assignee is None or any(a["username"] == assignee for a in i["assignees"]))
               and (wanted_state == "all" or i["state"] == wanted_state)]
        return jsonify(out)

    def get_file(p: dict[str, Any], file_path: str, raw: bool) -> Any:
        repo = state.repo(p)
        ref = request.args.get("ref") or p["default_branch"]
        if not request.args.get("ref") and not raw:
            raise GitLabError(400, "ref is missing", key="error")
        sha = repo.resolve(ref)
        data = repo.read(ref, file_path) if sha else None
        if data is None:
            raise not_found("File")
        if raw:
            return data, 200, {"Content-Type": "text/plain; charset=utf-8"}
        blob = repo.git("rev-parse", f"{ref}:{file_path}").strip()
        return {"file_name": file_path.rsplit("/", 1)[-1], "file_path": file_path, "size": len(data),
                "encoding": "base64", "content_sha256": hashlib.sha256(data).hexdigest(), "ref": ref,
                "blob_id": blob, "commit_id": sha, "last_commit_id": sha,
                "content": base64.b64encode(data).decode()}

    def branch_json(p: dict[str, Any], repo: GitRepo, name: str) -> dict[str, Any]:
        head = repo.head(name)
        c = repo.log(head or name, 1)[0]
        return {"name": name, "merged": False, "protected": False, "default": name == p["default_branch"],
                "developers_can_push": True, "developers_can_merge": True, "can_push": True,
                "web_url": f"{base()}/{p['path_with_namespace']}/-/tree/{name}",
                "commit": _commit_json(c, base(), p)}

    def paginated(items: list[Any]) -> Any:
        """One page of `items` (`page`, `per_page`: 20, at most 100) with GitLab's pagination
        headers; python-gitlab follows the `Link: rel="next"` header."""
        per_page = max(1, min(100, int(request.args.get("per_page") or 20)))
        page = max(1, int(request.args.get("page") or 1))
        answer = jsonify(items[per_page * (page - 1):per_page * page])
        answer.headers.update({"X-Page": str(page), "X-Per-Page": str(per_page), "X-Total": str(len(items))})
        if per_page * page < len(items):
            args = {**request.args.to_dict(), "page": str(page + 1), "per_page": str(per_page)}
            query = "&".join(f"{k}={quote(v, safe='')}" for k, v in args.items())
            answer.headers["X-Next-Page"] = str(page + 1)
            answer.headers["Link"] = f'<{request.base_url}?{query}>; rel="next"'
        return answer

    def tree(p: dict[str, Any]) -> Any:
        """The entries of one directory at `ref` (GitLab's "list repository tree", not recursive):
        404 "Tree Not Found" for a path that is no directory there."""
        repo = state.repo(p)
        ref = request.args.get("ref") or p["default_branch"]
        path = (request.args.get("path") or "").strip("/")
        if repo.resolve(ref) is None or (path and repo.kinds(ref, {path}).get(path) != "tree"):
            raise not_found("Tree")
        listing = repo.git("ls-tree", "-z", f"{ref}:{path}" if path else ref)
        entries = []
        for line in filter(None, listing.split("\0")):
            meta, name = line.split("\t", 1)
            mode, kind, sha = meta.split()
            entries.append({"id": sha, "name": name, "type": kind, "path": f"{path}/{name}" if path else name,
                            "mode": mode})
        return paginated(entries)

    def branches(p: dict[str, Any], name: str | None) -> Any:
        repo = state.repo(p)
        if request.method == "GET":
            if name is None:
                term = request.args.get("search") or ""
                found = [b for b in repo.branches()
                         if (b.startswith(term[1:]) if term.startswith("^") else
                             b.endswith(term[:-1]) if term.endswith("$") else term in b)]
                return paginated([branch_json(p, repo, b) for b in found])
            if repo.head(name) is None:
                raise not_found("Branch")
            return branch_json(p, repo, name)
        if request.method == "POST" and name is None:
            data = body()
            new, ref = param(data, "branch"), param(data, "ref")
            if repo.head(new) is not None:
                raise GitLabError(400, "Branch already exists")
            if repo.resolve(ref) is None:
                raise GitLabError(400, "Invalid reference name")
            with state.lock:
                try:
                    repo.create_branch(new, ref)
                except GitError as exc:  # another branch stands in its way (`a` beside `a/b`)
                    raise GitLabError(400, f"Failed to create branch '{new}': {exc}") from None
            return jsonify(branch_json(p, repo, new)), 201
        raise GitLabError(405, "405 Method Not Allowed")

    def commits(p: dict[str, Any], sha: str | None) -> Any:
        repo = state.repo(p)
        if request.method == "GET":
            if sha is not None:
                if repo.resolve(sha) is None:
                    raise not_found("Commit")
                return _commit_json(repo.log(sha, 1)[0], base(), p)
            ref = request.args.get("ref_name") or p["default_branch"]
            if repo.resolve(ref) is None:
                raise not_found("Commit")  # what GitLab answers for an unknown ref
            per_page = min(100, int(request.args.get("per_page", 20)))
            page = max(1, int(request.args.get("page", 1)))
            items = repo.log(ref, per_page * page)[per_page * (page - 1):]
            return jsonify([_commit_json(c, base(), p) for c in items])
        if request.method != "POST" or sha is not None:
            raise GitLabError(405, "405 Method Not Allowed")
        data = body()
        branch = param(data, "branch")
        message = param(data, "commit_message")
        actions = param(data, "actions")
        if not isinstance(actions, list) or not actions:
            raise GitLabError(400, "actions is invalid", key="error")
        start = data.get("start_branch")
        with state.lock:
            exists = repo.head(branch) is not None
            if not exists and not start:
                raise GitLabError(400, "You can only create or edit files when you are on a branch")
            if not exists and repo.head(start) is None:
                raise GitLabError(400, f"A branch called '{start}' does not exist")
            ref = branch if exists else start
            files: dict[str, str | None] = {}
            if any(not isinstance(a, dict) or not isinstance(a.get("file_path"), str) or not a["file_path"]
                   or a.get("action") not in ("create", "update", "delete") for a in actions):
                raise GitLabError(400, "actions is invalid", key="error")
            kinds = repo.kinds(ref, {a["file_path"] for a in actions})  # one git process for them all
            for a in actions:
                present = kinds.get(a["file_path"]) == "blob"
                if a["action"] == "create" and present:
                    raise GitLabError(400, "A file with this name already exists")
                if a["action"] in ("update", "delete") and not present:
                    raise GitLabError(400, "A file with this name doesn't exist")
                content = a.get("content", "")
                if a.get("encoding") == "base64":
                    content = base64.b64decode(content).decode()
                files[a["file_path"]] = None if a["action"] == "delete" else content
            try:
                new = repo.commit(branch, files, message if message.endswith("\n") else message + "\n",
                                  start_branch=start)
            except NameClash as exc:
                raise GitLabError(400, exc.problem) from None
            state.commits[p["path_with_namespace"]] = state.commits.get(p["path_with_namespace"], 0) + 1
            markers = [line for line in message.splitlines() if line.startswith("Orchestrator-Step:")]
            effects.record("gitlab_commit", f"{p['path_with_namespace']}@{branch}:{markers[-1] if markers else new}",
                           new)
        return jsonify(_commit_json(repo.log(new, 1)[0], base(), p)), 201

    def merge_requests(p: dict[str, Any]) -> Any:
        repo = state.repo(p)
        if request.method == "GET":
            source = request.args.get("source_branch")
            wanted = request.args.get("state", "all")
            return jsonify([m for m in state.mrs if m["project_id"] == p["id"]
                            and (source is None or m["source_branch"] == source)
                            and (wanted == "all" or m["state"] == wanted)])
        if request.method != "POST":
            raise GitLabError(405, "405 Method Not Allowed")
        data = body()
        source, target, title = param(data, "source_branch"), param(data, "target_branch"), param(data, "title")
        with state.lock:
            if repo.head(source) is None:
                raise not_found("Branch")  # GitLab: source branch does not exist
            if repo.head(target) is None:
                raise not_found("Branch")
            for m in state.mrs:
                if m["project_id"] == p["id"] and m["source_branch"] == source and m["state"] == "opened":
                    raise GitLabError(409, [f"Another open merge request already exists for this source "
                                            f"branch: !{m['iid']}"])
            iid = 1 + max((m["iid"] for m in state.mrs if m["project_id"] == p["id"]), default=0)
            mr = {"id": len(state.mrs) + 1, "iid": iid, "project_id": p["id"], "title": title,
                  "description": data.get("description", ""), "state": "opened",
                  "source_branch": source, "target_branch": target,
                  "web_url": f"{base()}/{p['path_with_namespace']}/-/merge_requests/{iid}"}
            state.mrs.append(mr)
            state.save()
            effects.record("gitlab_merge_request", f"{p['path_with_namespace']}:{source}", str(mr["id"]))
        return jsonify(mr), 201

    return app


class _Quiet(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        pass


class GitLabEmulator:
    """The emulator on a real socket, served from a daemon thread (tests and the dev runner)."""

    def __init__(self, data_dir: Path, token: str = "dev-token", username: str = "demo",
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = create_app(Path(data_dir), {token: username})
        self.state: GitLabState = self.app.config["STATE"]
        self.host, self._port = host, port
        self._server: BaseWSGIServer | None = None

    @property
    def url(self) -> str:
        port = self._server.server_port if self._server else self._port
        return f"http://{'127.0.0.1' if self.host in ('', '0.0.0.0') else self.host}:{port}"

    def start(self) -> "GitLabEmulator":
        self._server = make_server(self.host, self._port, self.app, threaded=True, request_handler=_Quiet)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emulators.gitlab", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--data", default=os.environ.get("GITLAB_EMULATOR_DATA", "./data/gitlab"))
    parser.add_argument("--token", default=os.environ.get("GITLAB_TOKEN") or "dev-token")
    parser.add_argument("--user", default="demo")
    parser.add_argument("--demo", action="store_true", help="create the demo/balance project if missing")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    server = GitLabEmulator(Path(args.data), args.token, args.user, args.host, args.port).start()
    if args.demo:
        from .demo import DEMO_PROJECT, demo_files

        server.state.create_project(DEMO_PROJECT, demo_files())
    print(f"GitLab emulator on {server.url} (data in {args.data})", flush=True)
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
