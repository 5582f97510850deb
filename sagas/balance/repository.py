"""The repository facade: one interface over GitLab (python-gitlab) and a local git repository.

Workflows read files, commit several files in one commit, read branch heads, list a user's
issues, read the geometries manifest and open merge requests through `Repository`; they never
see which backend serves them.

Every write is idempotent. A commit message carries a marker line

    Orchestrator-Step: <key>

where the key names (saga, step, attempt); before committing, the facade looks for a commit
with that marker on the branch and returns it instead of committing again. A merge request for
a source branch that already has an open one returns that one.

Errors are typed: a missing file is a `FileMissing` result; a missing project is `NotFound`;
anything GitLab answers badly is `UpstreamError` (5xx, timeouts and connection errors are
retryable, 4xx are not).
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput, NotFound, UpstreamError
from orchestrator.jsonutil import loads, unstorable
from orchestrator.schemas import hidden_character, json_type, text_patterns

from .settings import BalanceSettings

MARKER_PREFIX = "Orchestrator-Step:"
GEOMETRIES_MANIFEST = "geometries_manifest.json"


def marker_line(key: str) -> str:
    return f"{MARKER_PREFIX} {key}"


def has_marker(message: str, key: str) -> bool:
    return marker_line(key) in (line.strip() for line in (message or "").splitlines())


@dataclass(frozen=True)
class ProjectInfo:
    id: str
    path: str
    default_branch: str
    repo_url: str


@dataclass(frozen=True)
class FileContent:
    path: str
    ref: str
    text: str

    def json(self) -> Any:
        """The file parsed as JSON; InvalidInput (422) naming the file if it is not JSON."""
        try:
            data = loads(self.text)
        except ValueError as exc:  # nesting past the parser's depth included
            raise InvalidInput(self.path, f"is not valid JSON: {exc}", status=422) from None
        bad = unstorable(data, "$")  # NaN, NUL: what is read from it is stored in the context
        if bad is not None:
            raise InvalidInput(f"{self.path}:{bad[0].removeprefix('$.')}", bad[1], status=422)
        return data


@dataclass(frozen=True)
class FileMissing:
    """A read of a file that does not exist at that ref: a result, not an error."""

    path: str
    ref: str


@dataclass(frozen=True)
class CommitResult:
    sha: str
    created: bool  # False: an earlier commit with the same marker was found and returned


@dataclass
class MergeRequest:
    iid: int
    source_branch: str
    target_branch: str
    title: str
    state: str
    web_url: str
    created: bool = field(default=True)

    def as_dict(self) -> dict[str, Any]:
        return {"iid": self.iid, "source_branch": self.source_branch, "target_branch": self.target_branch,
                "title": self.title, "state": self.state, "web_url": self.web_url}


class Repository(Protocol):
    """What the workflows need from a git hosting service."""

    backend: str

    def project(self, project: str) -> ProjectInfo: ...

    def branch_head(self, project: str, branch: str) -> str | None: ...

    def read_file(self, project: str, path: str, ref: str) -> FileContent | FileMissing: ...

    def ensure_branch(self, project: str, branch: str) -> str:
        """The branch's head, creating the branch from the default branch if it does not exist."""
        ...

    def find_commit(self, project: str, branch: str, key: str) -> str | None: ...

    def branch_clash(self, project: str, branch: str) -> str | None:
        """An existing branch `branch` cannot be created beside (git keeps branch names as
        paths: `issue` and `issue/42` cannot both be branches); None if there is none or
        `branch` exists itself."""
        ...

    def path_kinds(self, project: str, ref: str, paths: set[str]) -> dict[str, str]:
        """Which of `paths` exist at `ref`, and as what: {path: "blob" | "tree"}."""
        ...

    def commit_files(self, project: str, branch: str, files: dict[str, str], message: str,
                     key: str) -> CommitResult: ...

    def assigned_issues(self, username: str) -> list[dict[str, Any]]: ...

    def create_merge_request(self, project: str, source_branch: str, target_branch: str | None,
                             title: str) -> MergeRequest: ...


# -- helpers every backend shares ------------------------------------------------------------------
def merge_target(project: str, source_branch: str, target_branch: str | None, default_branch: str) -> str:
    """The branch a merge request goes to: the given one, else the project's default branch. The
    default is resolved before the two are compared, so a merge request from a branch into itself
    (e.g. main without a target_branch) is refused (400) like an explicit one, on every backend."""
    if target_branch is None:
        if source_branch == default_branch:
            raise InvalidInput("source_branch", f"is the default branch of {project}, where the merge request "
                                                "would go without a target_branch; merge from another branch")
        return default_branch
    if target_branch == source_branch:
        raise InvalidInput("target_branch", "must differ from source_branch")
    return target_branch


def read_at_branch(repo: Repository, project: str, path: str, branch: str) -> FileContent | FileMissing:
    """Read at the branch, or at the default branch while the branch does not exist yet."""
    ref = branch if repo.branch_head(project, branch) is not None else repo.project(project).default_branch
    return repo.read_file(project, path, ref)


class NameClash(InvalidInput):
    """A branch or file name that the repository's existing names stand in the way of: git keeps
    both as paths, so `a` and `a/b` cannot both exist. 400 naming `field` from the API's checks;
    422 (the request was fine, the repository changed) from a step's commit."""


def branch_in_the_way(branch: str, found: str, status: int = 400) -> NameClash:
    """The NameClash naming `branch` that the existing branch `found` stands in the way of."""
    return NameClash("branch", f"'{branch}' cannot be created beside the existing branch '{found}': git keeps "
                               "branch names as paths, so 'a' and 'a/b' cannot both be branches", status)


def _prefixes(path: str) -> list[str]:
    parts = path.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def path_clash(paths: list[str], kinds: dict[str, str]) -> tuple[str, str] | None:
    """The first of `paths` that cannot be written beside what `kinds` ({path: "blob" | "tree"},
    a ref's content) holds: (the existing name in its way, why). A file where one of its
    directories would go, or a path that is a directory. None when all can be written."""
    for path in paths:
        for prefix in _prefixes(path):
            if kinds.get(prefix) == "blob":
                return prefix, f"'{prefix}' is a file there, so '{path}' cannot be written beside it"
        if kinds.get(path) == "tree":
            return path, f"'{path}' is a directory there"
    return None


def clash_queries(paths: list[str]) -> set[str]:
    """The names whose kind `path_clash` needs: each path and each of its directories."""
    return {q for path in paths for q in (path, *_prefixes(path))}


def check_names_free(repo: Repository, project: str, branch: str, paths: dict[str, list[str]] | None = None,
                     pending: list[str] | None = None) -> None:
    """Before anything is started: `branch` can be created (or exists), and the files the work
    will write ({field: [path, ...]}) fit the branch's tree (the default branch's while the
    branch does not exist) and the files that work still running on the branch will write
    (`pending`). NameClash (400) naming `branch` or the field otherwise; git would refuse the
    commit only once the work runs."""
    found = repo.branch_clash(project, branch)
    if found is not None:
        raise branch_in_the_way(branch, found)
    if not paths:
        return
    ref = branch if repo.branch_head(project, branch) is not None else repo.project(project).default_branch
    every = [p for names in paths.values() for p in names]
    kinds = repo.path_kinds(project, ref, clash_queries(every))
    planned = {q: "tree" for p in pending or () for q in _prefixes(p)} | {p: "blob" for p in pending or ()}
    for field_name, names in paths.items():
        clash = path_clash(names, planned | kinds)
        if clash is not None:
            whose = f"branch '{ref}'" if clash[0] in kinds else "written by a calculation still running on the branch"
            raise NameClash(field_name, f"{clash[1]} ({whose})")


def commit_once(repo: Repository, project: str, branch: str, files: dict[str, str], message: str,
                key: str) -> CommitResult:
    """Commit `files` unless a commit with the marker `key` is already on the branch. Paths git
    or GitLab would refuse are an InvalidInput naming `files` (check_repository_paths)."""
    check_repository_paths(list(files), "files")
    found = repo.find_commit(project, branch, key)
    if found is not None:
        return CommitResult(found, created=False)
    return repo.commit_files(project, branch, files, f"{message.rstrip()}\n\n{marker_line(key)}\n", key)


def geometries(repo: Repository, project: str, ref: str | None = None) -> list[dict[str, Any]]:
    """Read and validate geometries_manifest.json; 422 naming the problem when malformed."""
    info = repo.project(project)
    found = repo.read_file(project, GEOMETRIES_MANIFEST, ref or info.default_branch)
    if isinstance(found, FileMissing):
        if ref is not None and repo.branch_head(project, ref) is None:  # the ref is at fault, not the file
            raise NotFound(f"no branch '{ref}' in {info.path}", field="ref")
        raise NotFound(f"{GEOMETRIES_MANIFEST} not found at ref '{found.ref}'", field=GEOMETRIES_MANIFEST)
    return validate_manifest(found.json())


def validate_manifest(data: Any) -> list[dict[str, Any]]:
    """`{"geometries": [{"id", "name", "file", ...}]}`: ids unique, strings non-empty."""

    def bad(where: str, problem: str) -> InvalidInput:
        return InvalidInput(f"{GEOMETRIES_MANIFEST}:{where}", problem, status=422)

    if not isinstance(data, dict):
        raise bad("$", "must be a JSON object with a 'geometries' list")
    items = data.get("geometries")
    if not isinstance(items, list):
        raise bad("geometries", "is required and must be a list")
    seen: set[str] = set()
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"geometries[{i}]", "must be an object")
        for name in ("id", "name", "file"):
            value = item.get(name)
            if not isinstance(value, str) or not value.strip():
                raise bad(f"geometries[{i}].{name}", "is required and must be a non-empty string")
        if item["id"] in seen:
            raise bad(f"geometries[{i}].id", f"duplicate id '{item['id']}'")
        seen.add(item["id"])
        out.append(item)
    return out


# -- a git repository on disk (the local backend, and the GitLab emulator's storage) ---------------
class GitError(Exception):
    pass


class GitRepo:
    """A bare or non-bare git repository written through plumbing only: commits go straight to a
    branch ref (compare-and-swap), never through a working tree or the shared index."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def init(cls, path: Path, default_branch: str = "main") -> "GitRepo":
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "init", "-q", "--bare", "-b", default_branch, str(path)], check=True)
        return cls(path)

    @staticmethod
    def is_repo(path: Path) -> bool:
        return (path / "HEAD").is_file() and (path / "objects").is_dir() or (path / ".git").exists()

    def git(self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None,
            check: bool = True) -> str:
        base = {"GIT_AUTHOR_NAME": "orchestrator", "GIT_AUTHOR_EMAIL": "orchestrator@localhost",
                "GIT_COMMITTER_NAME": "orchestrator", "GIT_COMMITTER_EMAIL": "orchestrator@localhost"}
        proc = subprocess.run(["git", "-C", str(self.path), *args], input=input, capture_output=True,
                              env={**os.environ, **base, **(env or {})})
        if check and proc.returncode != 0:
            raise GitError(proc.stderr.decode(errors="replace").strip() or f"git {args[0]} failed")
        return proc.stdout.decode(errors="replace")

    def default_branch(self) -> str:
        ref = self.git("symbolic-ref", "-q", "HEAD", check=False).strip()
        return ref.removeprefix("refs/heads/") or "main"

    def head(self, branch: str) -> str | None:
        out = self.git("rev-parse", "-q", "--verify", f"refs/heads/{branch}^{{commit}}", check=False).strip()
        return out or None

    def resolve(self, ref: str) -> str | None:
        out = self.git("rev-parse", "-q", "--verify", f"{ref}^{{commit}}", check=False).strip()
        return out or None

    def read(self, ref: str, path: str) -> bytes | None:
        proc = subprocess.run(["git", "-C", str(self.path), "cat-file", "blob", f"{ref}:{path}"],
                              capture_output=True)
        return proc.stdout if proc.returncode == 0 else None

    def log(self, ref: str, limit: int = 100) -> list[dict[str, str]]:
        if self.resolve(ref) is None:
            return []
        out = self.git("log", f"-{limit}", "--format=%H%x1f%an%x1f%ae%x1f%aI%x1f%B%x1e", ref)
        commits = []
        for chunk in out.split("\x1e"):
            chunk = chunk.strip("\n")
            if not chunk:
                continue
            sha, name, email, date, message = chunk.split("\x1f", 4)
            commits.append({"id": sha, "author_name": name, "author_email": email, "created_at": date,
                            "message": message})
        return commits

    def find_marker(self, branch: str, key: str) -> str | None:
        if self.head(branch) is None:
            return None
        out = self.git("log", "--format=%H", "-F", f"--grep={marker_line(key)}", f"refs/heads/{branch}").split()
        for sha in out:  # --grep matches a substring; check the exact line
            if has_marker(self.git("log", "-1", "--format=%B", sha), key):
                return sha
        return None

    def kinds(self, ref: str, paths: set[str]) -> dict[str, str]:
        """{path: "blob" | "tree"} of those of `paths` that exist at `ref`, in one git process."""
        order = sorted(paths)
        if not order or self.resolve(ref) is None:
            return {}
        out = self.git("cat-file", "--batch-check", input="".join(f"{ref}:{p}\n" for p in order).encode())
        lines = out.splitlines()
        return {p: line.split()[1] for p, line in zip(order, lines)
                if not line.endswith(" missing") and len(line.split()) >= 3}

    def branch_clash(self, branch: str) -> str | None:
        """An existing branch that stands in the way of creating `branch` (see Repository)."""
        if self.head(branch) is not None:
            return None
        for prefix in _prefixes(branch):
            if self.head(prefix) is not None:
                return prefix
        under = self.git("for-each-ref", "--count=1", "--format=%(refname:short)", f"refs/heads/{branch}/")
        return under.strip() or None

    def commit(self, branch: str, files: dict[str, str | None], message: str,
               start_branch: str | None = None) -> str:
        """One commit on `branch` (created from `start_branch` or the default branch when missing).
        A file whose content is None is deleted. Retries if another writer moved the branch.
        NameClash (422) naming `files` when a path cannot go beside the tree's (`a/b` where `a`
        is a file, or a directory's path), naming `branch` when an existing branch stands in
        the way of creating it; GitError for anything else git refuses."""
        written = [p for p, content in files.items() if content is not None]
        for _ in range(20):
            parent = self.head(branch)
            if parent is None:
                found = self.branch_clash(branch)
                if found is not None:  # before any object is written
                    raise branch_in_the_way(branch, found, 422)
                parent = self.head(start_branch or self.default_branch())
            clash = path_clash(written, self.kinds(parent, clash_queries(written))) if parent else None
            if clash is not None:  # update-index would replace the file by the directory, silently
                raise NameClash("files", f"{clash[1]} (branch '{branch}')", status=422)
            tree = self._tree(parent, files)
            args = ["commit-tree", tree, "-F", "-"] + (["-p", parent] if parent else [])
            sha = self.git(*args, input=message.encode()).strip()
            old = self.head(branch) or ""
            expected = parent if old else ""
            if old and old != parent:
                continue  # moved meanwhile: rebuild on the new head
            proc = subprocess.run(["git", "-C", str(self.path), "update-ref", f"refs/heads/{branch}", sha,
                                   expected or "0" * 40], capture_output=True)
            if proc.returncode == 0:
                return sha
            if (self.head(branch) or "") == old and self.branch_clash(branch) is None:
                # refused, not moved (and no branch made in its way meanwhile): trying again changes nothing
                raise GitError(proc.stderr.decode(errors="replace").strip() or f"update-ref {branch} failed")
        raise GitError(f"branch {branch} kept moving; commit abandoned")

    def _tree(self, parent: str | None, files: dict[str, str | None]) -> str:
        """The tree of `parent` with `files` written (None: deleted), in a private index: four git
        processes whatever the number of files."""
        with tempfile.TemporaryDirectory(prefix="orch-commit-") as tmp:
            env = {"GIT_INDEX_FILE": os.path.join(tmp, "index")}
            if parent:
                self.git("read-tree", parent, env=env)
            written = [(path, content) for path, content in files.items() if content is not None]
            blobs = []
            if written:
                names = []
                for i, (_, content) in enumerate(written):
                    names.append(os.path.join(tmp, f"blob{i}"))
                    with open(names[-1], "wb") as f:
                        f.write(content.encode())
                blobs = self.git("hash-object", "-w", "--no-filters", "--stdin-paths",
                                 input="".join(f"{n}\n" for n in names).encode()).split()
            entries = [f"100644 {blob}\t{path}\n" for (path, _), blob in zip(written, blobs)]
            entries += [f"0 {'0' * 40}\t{path}\n" for path, content in files.items() if content is None]
            if entries:
                self.git("update-index", "--index-info", input="".join(entries).encode(), env=env)
            return self.git("write-tree", env=env).strip()

    def create_branch(self, branch: str, ref: str) -> str:
        sha = self.resolve(ref)
        if sha is None:
            raise GitError(f"unknown ref {ref}")
        self.git("update-ref", f"refs/heads/{branch}", sha, "0" * 40)
        return sha

    def branches(self) -> list[str]:
        return [b for b in self.git("for-each-ref", "--format=%(refname:short)", "refs/heads/").split() if b]

    # Merge requests of the local backend live in a JSON file inside the git directory.
    def _mr_file(self) -> Path:
        git_dir = Path(self.git("rev-parse", "--absolute-git-dir").strip())
        return git_dir / "orchestrator-merge-requests.json"

    def merge_requests(self) -> list[dict[str, Any]]:
        f = self._mr_file()
        return json.loads(f.read_text()) if f.exists() else []

    def open_merge_request(self, source: str, target: str, title: str, web_url: str) -> tuple[dict[str, Any], bool]:
        f = self._mr_file()
        with open(f.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            items = json.loads(f.read_text()) if f.exists() else []
            for mr in items:
                if mr["source_branch"] == source and mr["state"] == "opened":
                    return mr, False
            iid = max((m["iid"] for m in items), default=0) + 1
            mr = {"iid": iid, "source_branch": source, "target_branch": target, "title": title,
                  "state": "opened", "web_url": f"{web_url}/-/merge_requests/{iid}"}
            items.append(mr)
            f.write_text(json.dumps(items, indent=2, allow_nan=False))
            return mr, True


# -- names a user gives: project paths, file paths, branch names --------------------------------
# One rule each, applied wherever a request names them (the API, the workflows' input checks and
# every backend call), so a name git or GitLab would refuse is a 400 before anything starts.
MAX_PATH_CHARS = 1024
MAX_SEGMENT_BYTES = 255
_PROJECT_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


#: The JSON Schema of a project path (`check_project`): ASCII segments, so a segment's bytes are
#: its characters.
PROJECT_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}(?:/[A-Za-z0-9_][A-Za-z0-9_.-]{0,254})*$"


def branch_pattern() -> str:
    """The JSON Schema pattern of a branch name `check_branch_name` accepts: its rules, without
    the surrounding whitespace it would drop (no whitespace at all: narrower than git, which takes
    a no-break space inside a name)."""
    chars = text_patterns()
    return (r"^(?![/-])(?!.*[/.]$)(?!.*(?:\.\.|//|@\{))(?!(?:@|HEAD)$)(?!(?:.*/)?\.)(?!.*\.lock(?:/|$))"
            rf"[^{chars['hidden']}{chars['space']}~^:?*\[\\]{{1,200}}$")


def repository_path_pattern() -> str:
    """The JSON Schema pattern of a path `check_repository_path` accepts, except the length of a
    segment in UTF-8 bytes (MAX_SEGMENT_BYTES), which a pattern counts in characters."""
    chars = text_patterns()
    return (rf"^(?=.*[^{chars['space']}])(?!/)(?!.*/$)(?!.*//)(?!(?:.*/)?\.\.?(?:/|$))"
            r"(?!(?:.*/)?\.[Gg][Ii][Tt](?:/|$))"
            rf"[^{chars['hidden']}\\]{{1,{MAX_PATH_CHARS}}}$")


def check_repository_path(path: Any, field: str) -> str:
    """A file path inside a repository that both git and GitLab accept, returned unchanged.

    Relative (no leading slash), segments joined by single slashes (no empty segment, no
    trailing slash), no `.` or `..` segment, no `.git` segment at any depth (in any case: git
    refuses them), no backslash, control, format or line separator character (`hidden_character`),
    at most MAX_SEGMENT_BYTES bytes a segment
    and MAX_PATH_CHARS characters in all. InvalidInput (400) naming `field` otherwise.
    """
    if not isinstance(path, str) or not path.strip():
        raise InvalidInput(field, "is required: a relative file path such as 'inputs/pump.json'")
    if len(path) > MAX_PATH_CHARS:
        raise InvalidInput(field, f"path is longer than {MAX_PATH_CHARS} characters")

    def bad(problem: str) -> InvalidInput:
        shown = json.dumps(path)[1:-1]
        shown = shown if len(shown) <= 120 else shown[:117] + "..."
        return InvalidInput(field, f"'{shown}' is not a repository file path: {problem}")

    if path.startswith("/"):
        raise bad("it must be relative (no leading '/')")
    if path.endswith("/"):
        raise bad("it names a directory (trailing '/')")
    if "\\" in path or _CONTROL.search(path):
        raise bad("backslashes and control characters are not allowed")
    hidden = hidden_character(path)
    if hidden is not None:  # as for a branch name: `a\u202eb.json` is listed as another name
        raise bad(f"a control or format character (U+{ord(path[hidden]):04X} at position {hidden}) would "
                  "hide what the name says")
    for segment in path.split("/"):
        if segment == "":
            raise bad("empty segment ('//')")
        if segment in (".", ".."):
            raise bad(f"'{segment}' segment")
        if segment.lower() == ".git":
            raise bad("'.git' segment (git's own directory)")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT_BYTES:
            raise bad(f"a segment is longer than {MAX_SEGMENT_BYTES} bytes")
    return path


def check_repository_paths(paths: list[str], field: str) -> list[str]:
    """Each path checked (check_repository_path), and none a directory of another: one commit
    cannot hold both `a` and `a/b.json`."""
    for path in paths:
        check_repository_path(path, field)
    given = set(paths)
    for path in paths:
        for prefix in _prefixes(path):
            if prefix in given:
                raise InvalidInput(field, f"'{prefix}' is a file and also the directory of '{path}'")
    return paths


def check_project(project: Any) -> str:
    """A project id (an integer, or digits) or path ('group/sub/project'), as GitLab names them:
    segments of letters, digits, '_', '-' and '.', not starting with '.' or '-' (so no '.', '..'
    or '.git' segment), joined by single slashes. Surrounding whitespace is dropped. 400 naming
    `project` otherwise."""
    if isinstance(project, int) and not isinstance(project, bool):
        return str(project)
    if project is not None and not isinstance(project, str):
        raise InvalidInput("project", f"must be a string or an integer, got {json_type(project)}")
    if project is None or not project.strip():
        raise InvalidInput("project", "is required: a project id or path such as 'demo/balance'")
    project = project.strip()
    if len(project) > MAX_PATH_CHARS or not all(
            _PROJECT_SEGMENT.match(s) and len(s) <= MAX_SEGMENT_BYTES for s in project.split("/")):
        raise InvalidInput("project", f"'{json.dumps(project)[1:-1]}' is not a project id or path: "
                           "segments of letters, digits, '_', '-' and '.' (not starting with '.' or '-') "
                           "joined by single '/'")
    return project


def check_branch_name(branch: Any, field: str = "branch") -> str:
    """A branch name `git check-ref-format --branch` accepts (and GitLab too): no component that
    starts with '.' or ends with '.lock', no '..', '//', '@{', control character, space or any of
    ~^:?*[\\; not starting with '/' or '-', not ending with '/' or '.', not '@' nor 'HEAD' (git
    refuses refs/heads/HEAD: every command would then warn that 'HEAD' is ambiguous), at most 200
    characters; and, stricter than git, no Unicode control, format or line/paragraph separator
    character (`orchestrator.schemas.hidden_character`: git takes them, but `issue/\u202e24`
    displays as `issue/42`). Surrounding whitespace is dropped. 400 naming `field`
    otherwise."""
    if branch is not None and not isinstance(branch, str):
        raise InvalidInput(field, f"must be a string, got {json_type(branch)}")
    if branch is None or not branch.strip():
        raise InvalidInput(field, "is required: a branch name such as 'issue/42-new-calculation'")
    branch = branch.strip()
    components = branch.split("/")
    bad = (branch.startswith(("/", "-")) or branch.endswith(("/", ".")) or ".." in branch
           or "//" in branch or "@{" in branch or branch in ("@", "HEAD") or len(branch) > 200
           or any(c in branch for c in " ~^:?*[\\") or _CONTROL.search(branch) is not None
           or any(c.startswith(".") or c.endswith(".lock") for c in components))
    if bad:
        raise InvalidInput(field, f"'{json.dumps(branch)[1:-1]}' is not a valid git branch name")
    hidden = hidden_character(branch)
    if hidden is not None:
        raise InvalidInput(field, f"'{json.dumps(branch)[1:-1]}' contains a control or format character "
                                  f"(U+{ord(branch[hidden]):04X} at position {hidden}), which would hide "
                                  "what the name says")
    return branch


class LocalRepository:
    """Every git repository under GIT_REPOS_DIR; a project's path is its folder relative to it.
    Issues do not exist in a plain git repository: the list is always empty."""

    backend = "local"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def _repo(self, project: str) -> GitRepo:
        project = check_project(project)
        for candidate in (self.root / project, self.root / f"{project}.git"):
            # never outside GIT_REPOS_DIR, even through a symbolic link, nor the folder itself
            inside = candidate.resolve().is_relative_to(self.root) and candidate.resolve() != self.root
            if inside and candidate.is_dir() and GitRepo.is_repo(candidate):
                return GitRepo(candidate)
        raise NotFound(f"project '{project}' not found", field="project")

    def project(self, project: str) -> ProjectInfo:
        repo = self._repo(project)
        path = str(repo.path.relative_to(self.root)).removesuffix(".git")
        return ProjectInfo(id=path, path=path, default_branch=repo.default_branch(),
                           repo_url=repo.path.as_uri())

    def branch_head(self, project: str, branch: str) -> str | None:
        return self._repo(project).head(branch)

    def ensure_branch(self, project: str, branch: str) -> str:
        repo = self._repo(project)
        head = repo.head(branch)
        if head is None:
            try:
                head = repo.create_branch(branch, repo.default_branch())
            except GitError:  # created concurrently, or another branch stands in its way
                head = repo.head(branch)
                found = repo.branch_clash(branch) if head is None else None
                if found is not None:
                    raise branch_in_the_way(branch, found, 422) from None
        if head is None:
            raise InvalidInput("branch", f"branch '{branch}' cannot be created: the project has no commits", status=422)
        return head

    def read_file(self, project: str, path: str, ref: str) -> FileContent | FileMissing:
        data = self._repo(project).read(ref, path)
        return FileMissing(path, ref) if data is None else FileContent(path, ref, data.decode())

    def find_commit(self, project: str, branch: str, key: str) -> str | None:
        return self._repo(project).find_marker(branch, key)

    def branch_clash(self, project: str, branch: str) -> str | None:
        return self._repo(project).branch_clash(branch)

    def path_kinds(self, project: str, ref: str, paths: set[str]) -> dict[str, str]:
        return self._repo(project).kinds(ref, paths)

    def commit_files(self, project: str, branch: str, files: dict[str, str], message: str,
                     key: str) -> CommitResult:
        repo = self._repo(project)
        return CommitResult(repo.commit(branch, dict(files), message), created=True)

    def assigned_issues(self, username: str) -> list[dict[str, Any]]:
        return []

    def create_merge_request(self, project: str, source_branch: str, target_branch: str | None,
                             title: str) -> MergeRequest:
        repo = self._repo(project)
        info = self.project(project)
        target = merge_target(info.path, source_branch, target_branch, info.default_branch)
        if repo.head(source_branch) is None:
            raise InvalidInput("source_branch", f"branch '{source_branch}' does not exist", status=422)
        if repo.head(target) is None:
            raise InvalidInput("target_branch", f"branch '{target}' does not exist", status=422)
        mr, created = repo.open_merge_request(source_branch, target, title, info.repo_url)
        return MergeRequest(**mr, created=created)


class GitLabRepository:
    """GitLab REST API v4 through python-gitlab. Transient failures are not retried here (no sleep
    in a request or a worker): they surface as retryable UpstreamError and the step's policy
    schedules the retry as a timer row."""

    backend = "gitlab"

    def __init__(self, url: str, token: str, timeout: float = 10.0) -> None:
        import gitlab

        self.gl = gitlab.Gitlab(url, private_token=token or None, timeout=timeout,
                                retry_transient_errors=False)
        self.timeout = timeout
        self._projects: dict[str, Any] = {}

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        import gitlab
        import requests

        try:
            return fn(*args, **kwargs)
        except gitlab.exceptions.GitlabError as exc:
            status = exc.response_code
            reason = exc.error_message
            if isinstance(reason, bytes):
                reason = reason.decode(errors="replace")
            if isinstance(reason, (dict, list)):
                reason = json.dumps(reason)
            if status == 401:
                reason = f"{reason} (check GITLAB_TOKEN)"
            raise UpstreamError("gitlab", f"{what} -> {status}: {reason}", upstream_status=status) from None
        except requests.Timeout:
            raise UpstreamError("gitlab", f"{what} timed out after {self.timeout:g}s") from None
        except requests.RequestException as exc:
            raise UpstreamError("gitlab", f"{what} failed: {type(exc).__name__}") from None

    def _project(self, project: str) -> Any:
        project = check_project(project)
        if project not in self._projects:
            try:
                self._projects[project] = self._call(f"GET project {project}", self.gl.projects.get, project)
            except UpstreamError as exc:
                if exc.upstream_status == 404:
                    raise NotFound(f"project '{project}' not found on GitLab", field="project") from None
                raise
        return self._projects[project]

    def project(self, project: str) -> ProjectInfo:
        p = self._project(project)
        return ProjectInfo(id=str(p.id), path=p.path_with_namespace, default_branch=p.default_branch or "main",
                           repo_url=p.http_url_to_repo)

    def branch_head(self, project: str, branch: str) -> str | None:
        p = self._project(project)
        try:
            b = self._call(f"GET branch {branch}", p.branches.get, branch)
        except UpstreamError as exc:
            if exc.upstream_status == 404:
                return None
            raise
        return str(b.commit["id"])

    def ensure_branch(self, project: str, branch: str) -> str:
        head = self.branch_head(project, branch)
        if head is not None:
            return head
        p = self._project(project)
        try:
            b = self._call(f"POST branch {branch}", p.branches.create,
                           {"branch": branch, "ref": self.project(project).default_branch})
        except UpstreamError as exc:
            head = self.branch_head(project, branch) if exc.upstream_status == 400 else None
            if head is None:
                raise
            return head
        return str(b.commit["id"])

    def read_file(self, project: str, path: str, ref: str) -> FileContent | FileMissing:
        p = self._project(project)
        try:
            f = self._call(f"GET file {path}@{ref}", p.files.get, file_path=path, ref=ref)
        except UpstreamError as exc:
            if exc.upstream_status == 404:
                return FileMissing(path, ref)
            raise
        return FileContent(path, ref, base64.b64decode(f.content).decode())

    def find_commit(self, project: str, branch: str, key: str) -> str | None:
        if self.branch_head(project, branch) is None:
            return None
        p = self._project(project)
        commits = self._call(f"GET commits of {branch}", p.commits.list, ref_name=branch, per_page=100,
                             get_all=False)
        for c in commits:
            if has_marker(c.message, key):
                return str(c.id)
        return None

    def branch_clash(self, project: str, branch: str) -> str | None:
        if self.branch_head(project, branch) is not None:
            return None
        for prefix in _prefixes(branch):
            if self.branch_head(project, prefix) is not None:
                return prefix
        p = self._project(project)  # GitLab's search: '^term' for names that begin with term
        under = self._call(f"GET branches under {branch}/", p.branches.list, search=f"^{branch}/", per_page=1,
                           get_all=False)
        return str(under[0].name) if under else None

    def path_kinds(self, project: str, ref: str, paths: set[str]) -> dict[str, str]:
        # one listing of each directory that holds one of the paths
        p = self._project(project)
        kinds: dict[str, str] = {}
        for directory in sorted({path.rpartition("/")[0] for path in paths}):
            try:
                entries = self._call(f"GET tree {directory or '/'}@{ref}", p.repository_tree, path=directory,
                                     ref=ref, per_page=100, get_all=True)
            except UpstreamError as exc:
                if exc.upstream_status == 404:  # no such directory (or ref)
                    continue
                raise
            kinds.update({e["path"]: e["type"] for e in entries if e["path"] in paths})
        return kinds

    def commit_files(self, project: str, branch: str, files: dict[str, str], message: str,
                     key: str) -> CommitResult:
        p = self._project(project)
        exists = self.branch_head(project, branch) is not None
        present = self.path_kinds(project, branch, set(files)) if exists else {}  # a listing per directory
        actions = [{"action": "update" if present.get(path) == "blob" else "create", "file_path": path,
                    "content": content} for path, content in files.items()]
        data: dict[str, Any] = {"branch": branch, "commit_message": message, "actions": actions}
        if not exists:
            data["start_branch"] = self.project(project).default_branch
        c = self._call(f"POST commit to {branch}", p.commits.create, data)
        return CommitResult(str(c.id), created=True)

    def assigned_issues(self, username: str) -> list[dict[str, Any]]:
        issues = self._call("GET issues", self.gl.issues.list, scope="all", assignee_username=username,
                            state="opened", per_page=100, get_all=False)
        return [{"id": i.id, "iid": i.iid, "project_id": i.project_id, "title": i.title, "state": i.state,
                 "web_url": i.web_url, "labels": getattr(i, "labels", [])} for i in issues]

    def create_merge_request(self, project: str, source_branch: str, target_branch: str | None,
                             title: str) -> MergeRequest:
        p = self._project(project)
        info = self.project(project)
        target = merge_target(info.path, source_branch, target_branch, info.default_branch)

        def existing() -> MergeRequest | None:
            found = self._call("GET merge requests", p.mergerequests.list, source_branch=source_branch,
                               state="opened", per_page=100, get_all=False)
            for mr in found:
                return MergeRequest(iid=mr.iid, source_branch=mr.source_branch, target_branch=mr.target_branch,
                                    title=mr.title, state=mr.state, web_url=mr.web_url, created=False)
            return None

        mr_found = existing()
        if mr_found is not None:
            return mr_found
        try:
            mr = self._call("POST merge request", p.mergerequests.create,
                            {"source_branch": source_branch, "target_branch": target, "title": title})
        except UpstreamError as exc:
            if exc.upstream_status == 409:  # opened concurrently: answer with that one
                mr_found = existing()
                if mr_found is not None:
                    return mr_found
            if exc.upstream_status in (400, 404, 422):
                raise InvalidInput("source_branch", exc.message, status=422) from None
            raise
        return MergeRequest(iid=mr.iid, source_branch=mr.source_branch, target_branch=mr.target_branch,
                            title=mr.title, state=mr.state, web_url=mr.web_url, created=True)


def open_repository(settings: Settings) -> Repository:
    """GitLab when GITLAB_URL is set, else the local git repositories under GIT_REPOS_DIR."""
    balance = BalanceSettings.from_settings(settings)
    if balance.gitlab_url:
        return GitLabRepository(balance.gitlab_url, balance.gitlab_token, balance.gitlab_timeout)
    return LocalRepository(balance.git_repos_dir)


def project_from_repo_url(repo_url: str, settings: Settings) -> str:
    """The project path a task message's repoUrl points at (for workers using this facade)."""
    parsed = urlparse(repo_url)
    if parsed.scheme == "file":
        root = Path(BalanceSettings.from_settings(settings).git_repos_dir).resolve()
        return str(Path(parsed.path).resolve().relative_to(root)).removesuffix(".git")
    return parsed.path.strip("/").removesuffix(".git")
