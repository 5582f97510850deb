"""Canonical JSON and digests (history payload digests, request fingerprints)."""
from __future__ import annotations

import hashlib
import json
import math
import sys
from datetime import datetime, timezone
from typing import Any


def why_not_json(exc: BaseException) -> str:
    """What is wrong with a text `json.loads` refused, for an error that names the field: the
    parser's own words, except where they are Python's (a number past the interpreter's 4300-digit
    limit, nesting past the recursion limit, bytes that are not UTF-8)."""
    if isinstance(exc, RecursionError):
        return "is nested too deeply"
    if isinstance(exc, UnicodeDecodeError):
        return "is not valid UTF-8"
    if "digits" in str(exc) and "limit" in str(exc):
        return f"has a number of more than {sys.get_int_max_str_digits()} digits"
    return str(exc)


class NotJSON(ValueError):
    """Text `loads` refused; its message is `why_not_json`'s words (no parser position for
    nesting: "is nested too deeply"). `field` is the dotted path of the value at fault when there
    is one (a duplicated key), else None; the message is then `<field>: <problem>`."""

    def __init__(self, problem: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field, self.problem = field, problem


class _DuplicateKey(Exception):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # the hook of every object: a dict shorter than its pairs had a key twice
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey
    return obj


class _Marked(dict):  # type: ignore[type-arg]
    duplicate: str


def _marking(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        obj = _Marked(obj)
        obj.duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
    return obj


def _duplicate_path(raw: str | bytes | bytearray) -> str:
    """The dotted path of the first key `raw` has twice in one object (only on that error: the
    parse again marks the objects, a walk names the first marked)."""
    stack: list[tuple[str, Any]] = [("", json.loads(raw, object_pairs_hook=_marking))]
    while stack:
        where, item = stack.pop()
        if isinstance(item, _Marked):
            return f"{where}.{item.duplicate}" if where else item.duplicate
        if isinstance(item, dict):
            stack.extend(reversed([(f"{where}.{k}" if where else k, v) for k, v in item.items()]))
        elif isinstance(item, list):
            stack.extend(reversed([(f"{where}.{i}" if where else str(i), v) for i, v in enumerate(item)]))
    return "body"


def loads(raw: str | bytes | bytearray) -> Any:
    """`json.loads` for bytes a client sent (request bodies, WebSocket frames, Kafka events, Redis
    callbacks, calculation results, repository files): every refusal is a ValueError (NotJSON),
    nesting past the recursion limit included. `json.loads` raises RecursionError there, which a
    caller catching ValueError lets through as a crash (a 500, a dead socket, a dead consumer).
    An object with a key twice is refused too (`youtube_url: appears twice in an object`, NotJSON's
    `field` its dotted path): `json.loads` keeps the last, so a check could pass on one value and
    the work run on another.

    Bytes must be UTF-8 (RFC 8259 for JSON between systems; a leading byte order mark is
    allowed, as it permits): `json.loads` would guess UTF-16 or UTF-32 from the first bytes and
    take such a text. An encoded surrogate decodes as `json.loads` decodes it (`surrogatepass`),
    so `unstorable` names the field that holds it."""
    try:
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8", "surrogatepass")
            if raw.startswith("\ufeff"):
                raw = raw[1:]
        return json.loads(raw, object_pairs_hook=_unique)
    except RecursionError:
        raise NotJSON("is nested too deeply") from None
    except _DuplicateKey:
        path = _duplicate_path(raw)
        raise NotJSON("appears twice in an object", path) from None
    except ValueError as exc:  # JSONDecodeError, a number past the digit limit
        raise NotJSON(why_not_json(exc)) from None


# One encoder for every call: json.dumps builds a new one per call when given options.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


def canonical(value: Any) -> str:
    return _CANONICAL.encode(value)


def digest(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def as_utc(value: datetime) -> datetime:
    """`value` in UTC, aware. A naive value is UTC: SQLite hands timestamps back without a zone,
    the engine stores only UTC, and an ISO time without an offset is read as UTC. Raises
    OverflowError when the conversion leaves datetime's range (a year-1 time with an offset)."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def utc_iso(value: datetime | None, timespec: str = "auto") -> str | None:
    """ISO 8601 in UTC with its offset always written ("2025-10-29T10:00:00.123456+00:00"), on
    every database: a naive value (SQLite hands timestamps back without a zone) is UTC, as the
    engine stores only UTC. A time without an offset would be read as local time by many clients
    (JavaScript's Date among them)."""
    if value is None:
        return None
    return as_utc(value).isoformat(timespec=timespec)


def iso(value: datetime | None) -> str | None:
    """`utc_iso` to the second, the precision of the media seed's examples
    ("2025-10-29T10:00:00+00:00"; the seed shows no offset, which is ambiguous: we add it)."""
    return utc_iso(value, "seconds")


#: The largest finite double, as an integer: the bound of a JSON number every reader can hold.
_LARGEST_DOUBLE = int(sys.float_info.max)


#: The deepest nesting of arrays and objects taken from outside (`unstorable`).
MAX_DEPTH = 100


def unstorable(value: Any, path: str = "") -> tuple[str, str] | None:
    """Where decoded JSON holds a value that a database cannot store, and why; None if it holds none.

    PostgreSQL's text and jsonb refuse the NUL character (`\\u0000`), and a lone UTF-16 surrogate
    (`"\\ud800"`, which JSON parsers accept) cannot be encoded as UTF-8 at all. Python's parser
    also accepts `NaN`, `Infinity` and `-Infinity` (and turns `1e999` into infinity), which are
    not JSON: PostgreSQL's json refuses them, and SQLite stores them where json_extract then fails
    on every later read. An integer written out to hundreds of digits parses too, but no reader
    that takes JSON numbers as doubles (SQLite's json_extract, JavaScript, the calculation
    workers) can hold it: refused like `1e999`. Every string, number and object key is checked,
    depth first; the answer is the first one's dotted path, list indexes included as pydantic
    names them (`input.note`, `items.2.name`, a key as `input.<key>` with the key JSON-escaped),
    and the problem.
    `path` is the name of `value` itself ("" for a request body: its fields are named bare).

    Nesting deeper than MAX_DEPTH arrays and objects is refused too, naming the outermost field
    that holds it: the parser takes about 1,000 levels, but what is stored is encoded again
    further down the stack (a database's JSON encoder, a worker's message), where such a value
    raised RecursionError: a 500, or a workflow stuck with no failure recorded.
    """
    stack: list[tuple[str, Any, int]] = [(path, value, 0)]
    while stack:  # a loop, not recursion: a deeply nested body cannot exhaust the stack
        where, item, depth = stack.pop()
        if depth > MAX_DEPTH:  # named by the field of `value` that holds it, not its 100-step path
            inner = where[len(path) + 1:] if path else where
            field = ".".join(part for part in (path, inner.split(".", 1)[0]) if part) or "body"
            return field, f"is nested deeper than {MAX_DEPTH} levels of arrays and objects"
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem:
                return where or "body", problem
        elif isinstance(item, float) and not math.isfinite(item):
            return where or "body", "is not a finite number (NaN and Infinity are not JSON)"
        elif isinstance(item, int) and not -_LARGEST_DOUBLE <= item <= _LARGEST_DOUBLE:
            return where or "body", "is not a finite number (an integer beyond a double's range, about 1.8e308)"
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                name = f"{where}.{key}" if where else str(key)
                if isinstance(key, str):
                    problem = _text_problem(key)
                    if problem:
                        escaped = json.dumps(key)[1:-1]
                        return (f"{where}.{escaped}" if where else escaped), f"the object key {problem}"
                children.append((name, child, depth + 1))
            stack.extend(reversed(children))
        elif isinstance(item, (list, tuple)):
            stack.extend(reversed([(f"{where}.{i}" if where else str(i), child, depth + 1)
                                   for i, child in enumerate(item)]))
    return None


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "contains a NUL character (\\u0000), which cannot be stored"
    if text.isascii():  # a flag of the string: no surrogate, and no need to encode it to know
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "contains a lone UTF-16 surrogate (such as \\ud800), which is not valid Unicode text"
    return None


def storable(text: str) -> str:
    """`text` with what the database refuses written out as escapes (NUL as `\\u0000`, a lone
    surrogate as `\\udXXX`): for our own messages quoting others' text (errors, logs), which
    must be kept rather than refused."""
    if "\x00" in text:
        text = text.replace("\x00", "\\u0000")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def check_storable(value: Any, path: str = "") -> Any:
    """`value` unchanged, or InvalidInput naming the first place `unstorable` finds (see there)."""
    found = unstorable(value, path)
    if found is not None:
        from .errors import InvalidInput

        raise InvalidInput(*found)
    return value
