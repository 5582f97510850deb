"""Contract models: the base classes every input and output model derives from, and the one
adapter from a pydantic `ValidationError` to the API's error shape.

Every channel the product owns (HTTP bodies and query parameters, Kafka events, the AMQP
calculation task and result, the Redis chat callbacks) declares its shapes as pydantic v2 models
beside the code that uses them; `/openapi.json` and `/asyncapi.json` are generated from them.
A value that breaks a model becomes `InvalidInput` through `invalid_input`: HTTP answers it as
`{"error": "invalid_input", "message": "<field>: <problem>", "field": "<field>", "problem": ...}`
(400, or 413 for a value over a configured size limit), the Kafka bridge dead-letters the event
with `<field>: <problem>` as its reason. `field` is the dotted path of the first error
(`stories.0.story_id`).

Text a database cannot store (NUL, a lone surrogate) is refused before a model sees the data,
by the central walk `jsonutil.check_storable` (it names object keys too, which a model cannot).
"""
from __future__ import annotations

import functools
import ipaddress
import re
import unicodedata
from typing import Annotated, Any, Callable, TypeVar, Union
from urllib.parse import urlparse

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, RootModel, TypeAdapter, ValidationError, WithJsonSchema
from pydantic.annotated_handlers import GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import PydanticCustomError
from typing_extensions import TypeAliasType

from .errors import InvalidInput

M = TypeVar("M", bound=BaseModel)

#: The error type of a value over a configured size limit: answered 413, not 400.
TOO_LARGE = "too_large"

#: Bounds of the integers a database column or query parameter takes: a position compared in SQL
#: (offset, after_seq) fits a signed 64-bit integer; a value stored in an INTEGER column (a
#: sequence number, a process id) fits 32 bits. Beyond them the database answers an error.
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


class Contract(BaseModel):
    """An open shape: fields it does not name are ignored (kept out of the parsed value)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class Closed(Contract):
    """A closed JSON body: a field it does not name is refused, naming that field; JSON types
    are strict (`"true"` is not a boolean, `1` is not a string)."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class Event(Contract):
    """A message on a queue or topic: open (unknown fields ignored) and strict about JSON types
    (`"12"` is not an integer, `1` is not a string)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer: `error` (a code such as invalid_input, not_found, illegal_transition),
    `message` (for people), `field` (the dotted path of the input at fault, when there is one);
    some errors add details (`state` of a 409, `problem`, `upstream_status` of a 502, ...)."""

    model_config = ConfigDict(extra="allow", title="Error")

    error: str
    message: str
    field: str | None = None


def omittable(*, json_schema_extra: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """A field a body may leave out (it is then None: the caller applies its default) but not
    send as `null`: declared with its type without None (`remove_noise: bool = omittable()`), so
    a `null` is refused naming the field like any other wrong type. `kwargs` go to `Field`; the
    documented schema shows no `default: null`, and takes the keywords of `json_schema_extra`.
    A field whose contract allows `null` says so in its type instead (`str | None = None`)."""
    extra = dict(json_schema_extra or {})

    def document(schema: dict[str, Any]) -> None:
        schema.pop("default", None)
        schema.update(extra)

    return Field(None, json_schema_extra=document, **kwargs)


def problem(text: str, kind: str = "invalid") -> PydanticCustomError:
    """A validator's error with our wording (`text` is the problem, without the field name).
    `kind=TOO_LARGE` makes it a 413."""
    return PydanticCustomError(kind, text)


#: The longest URL a workflow passes on to a service (what browsers and most servers take).
MAX_URL_LENGTH = 2048


def _invisible(c: str) -> bool:
    # whitespace (Z*: U+2028 too) and control or format characters (C*: U+0085, U+200B, NUL):
    # none belongs in a URL unencoded, and the service it goes to would fail on it, not us
    return c.isspace() or unicodedata.category(c)[0] in "CZ"


_HOST_NAME = re.compile(r"[A-Za-z0-9_.~-]+")


def _valid_host(netloc: str, hostname: str) -> bool:
    """A host a client can connect to: a bracketed IPv6 address, or a name (an IPv4 address
    included) of letters, digits, `-`, `.`, `_`, `~` or non-ASCII letters (an internationalised
    name). Refused: percent-encoded names (`%zz`), IPvFuture (`[v1.x]`), other punctuation."""
    if netloc.startswith("["):
        try:
            ipaddress.IPv6Address(hostname.partition("%")[0])
        except ValueError:
            return False
        return True
    return all(_HOST_NAME.fullmatch(c) or (not c.isascii() and c.isalnum()) for c in hostname)


def check_url(value: str, schemes: tuple[str, ...], *, credentials: bool = False) -> str:
    """`value` as a URL of one of `schemes` with a host, surrounding blanks removed, or a
    validator's error saying what is wrong: too long, a whitespace or control character inside
    (with its code point and position), the wrong shape, or a port that is not a number from 1 to
    65535. User info (`user:password@`) is refused unless `credentials`: a URL a user submits as
    job input is shown in /jobs, /sagas and the console, where a password would be in clear; a
    setting such as an RTSP camera URL may carry its own. The refusal never quotes the URL."""
    url = value.strip(" \t\r\n")
    if len(url) > MAX_URL_LENGTH:
        raise problem(f"is too long: {len(url)} characters, at most {MAX_URL_LENGTH}")
    bad = next((i for i, c in enumerate(url) if _invisible(c)), None)
    if bad is not None:
        raise problem(f"contains a whitespace or control character (U+{ord(url[bad]):04X} at position {bad}); "
                      "percent-encode it")
    try:
        parsed = urlparse(url)
    except ValueError:  # an unclosed IPv6 bracket
        parsed = urlparse("")
    if not credentials and "@" in parsed.netloc:
        raise problem("must not contain credentials (user:password@ before the host)")
    if parsed.scheme.lower() not in schemes or not parsed.hostname:
        raise problem(f"must be an {'/'.join(schemes)} URL with a host, got {url[:80]!r}")
    if not _valid_host(parsed.netloc.rpartition("@")[2], parsed.hostname):
        raise problem("has an invalid host: a name, an IPv4 address or a bracketed IPv6 address")
    try:
        port = parsed.port  # ValueError: not a number, or past 65535
    except ValueError:
        port = 0
    if port == 0:
        raise problem("has an invalid port: it must be a number from 1 to 65535")
    return url


#: A language code: `auto`, or an ISO 639 language with optional BCP 47 subtags (`en`, `pt-BR`).
#: Also the `pattern` of the JSON Schemas that take one (anchored there: `^(...)$`).
LANGUAGE_PATTERN = r"auto|[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8})*"
_LANGUAGE = re.compile(LANGUAGE_PATTERN, re.ASCII)
MAX_LANGUAGE_LENGTH = 16


def check_language(value: str) -> str:
    """`value` in BCP 47's usual case if it is a language code (`auto`, `en`, `pt-BR`: `EN` is
    `en`, `pt-br` is `pt-BR`, as the tags are the same), else a validator's error."""
    if len(value) > MAX_LANGUAGE_LENGTH:
        raise problem(f"is too long: {len(value)} characters, at most {MAX_LANGUAGE_LENGTH}")
    if not _LANGUAGE.fullmatch(value):
        raise problem(f"must be a language code such as 'auto', 'en' or 'pt-BR', got {value[:40]!r}")
    language, *subtags = value.split("-")  # a region in capitals, a script in title case
    return "-".join([language.lower(), *(t.upper() if len(t) == 2 else t.title() if len(t) == 4 else t.lower()
                                         for t in subtags)])


#: An integer as text (a query parameter, a header): decimal digits, optionally after a minus
#: sign. Python's int() and pydantic's lax mode also take `1_0`, ` 10`, `+10`, `10.0` and other
#: scripts' digits (`١٠`), which no client means as 10.
DECIMAL_INTEGER = re.compile(r"-?[0-9]+")


def integer_text_problem(text: str) -> str | None:
    """Why `text` is not an integer in decimal digits (DECIMAL_INTEGER), or None."""
    if DECIMAL_INTEGER.fullmatch(text):
        return None
    return f"must be an integer in decimal digits, got {text[:40]!r}"


#: A number as text: decimal digits with an optional fraction and exponent (`24`, `0.5`, `1e3`),
#: optionally after a minus sign. float() also takes `1_0`, ` 24`, `+24`, `inf`, `nan` and other
#: scripts' digits.
DECIMAL_NUMBER = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")

#: A boolean as text: what the seeds' clients send (`true`, seed 004's `deep`) and its usual
#: spellings. pydantic's lax mode also takes `yes`, `on`, `t`, `y` and their opposites.
BOOLEAN_TEXTS = {"true": True, "false": False, "1": True, "0": False}


def number_text_problem(text: str) -> str | None:
    """Why `text` is not a number in decimal digits (DECIMAL_NUMBER), or None."""
    if DECIMAL_NUMBER.fullmatch(text):
        return None
    return f"must be a number in decimal digits, got {text[:40]!r}"


def boolean_text_problem(text: str) -> str | None:
    """Why `text` is not `true`, `false`, `1` or `0` (any case), or None."""
    if text.lower() in BOOLEAN_TEXTS:
        return None
    return f"must be true or false, got {text[:40]!r}"


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (`string`, `integer`, `object`, ...), for messages."""
    return {"str": "string", "int": "integer", "float": "number", "bool": "boolean", "list": "array",
            "dict": "object", "NoneType": "null"}.get(type(value).__name__, type(value).__name__)


def _problem(err: dict[str, Any], model: type[BaseModel] | None) -> str:
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    got = f", got {json_type(value)}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        if model is not None and len(err["loc"]) == 1:
            names = [f.alias or n for n, f in model.model_fields.items()]
            return f"unknown field; accepted: {', '.join(names)}"
        return "unknown field"
    if kind in ("string_type",):
        return "must be a string" + got
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return "must be an integer" + (f", got {value!r}" if isinstance(value, str) else got)
    if kind in ("float_type", "float_parsing"):
        return "must be a number" + (f", got {value!r}" if isinstance(value, str) else got)
    if kind in ("bool_type", "bool_parsing"):
        return "must be true or false" + (f", got {value!r}" if isinstance(value, str) else got)
    if kind == "list_type":
        return "must be an array" + got
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be an object" + got
    if kind == "string_too_short":
        return "must not be empty" if ctx.get("min_length") == 1 else f"must be at least {ctx['min_length']} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx['max_length']} characters"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')}, got {value!r}"
    if kind == "literal_error":
        return f"must be {ctx.get('expected')}, got {value!r}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return err["msg"].replace("Input should be", "must be") + f", got {value!r}"
    msg = str(err["msg"])
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            msg = msg[len(prefix):]
    return msg.replace("Input should be", "must be")


def field_path(loc: tuple[Any, ...], prefix: str = "") -> str:
    """The dotted path of an error location (`stories.0.story_id`); "body" for the whole value."""
    parts = [prefix] if prefix else []
    parts += [str(p) for p in loc]
    return ".".join(parts) or "body"


def invalid_input(exc: ValidationError, model: type[BaseModel] | None = None, prefix: str = "") -> InvalidInput:
    """The first error of `exc` as InvalidInput: `field` its dotted path, `problem` in the API's
    words, status 413 for a value over a configured size limit, 400 otherwise."""
    err = exc.errors(include_url=False)[0]
    status = 413 if err["type"] == TOO_LARGE else 400
    return InvalidInput(field_path(tuple(err["loc"]), prefix), _problem(dict(err), model), status=status)


def parse(model: type[M], data: Any, *, prefix: str = "", context: dict[str, Any] | None = None) -> M:
    """`data` validated as `model`; InvalidInput naming the first field at fault otherwise."""
    if not isinstance(data, dict) and not issubclass(model, RootModel):
        raise InvalidInput(prefix or "body", f"must be a JSON object, got {json_type(data)}")
    try:
        return model.model_validate(data, context=context)
    except ValidationError as exc:
        raise invalid_input(exc, model, prefix) from None


def parse_value(kind: Any, value: Any, field: str) -> Any:
    """One value validated as `kind` (a type or Annotated type); InvalidInput naming `field`."""
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError as exc:
        raise invalid_input(exc, prefix=field) from None


#: Categories that show nothing: space separators (Zs), line and paragraph separators (Zl, Zp) and
#: format characters (Cf: direction marks such as U+202E and U+200F, zero-width spaces).
_BLANK = frozenset({"Zs", "Zl", "Zp", "Cf"})
#: The Unicode categories of characters that hide or reorder text: controls (Cc), format characters
#: (Cf), line and paragraph separators (Zl, Zp). No identifier may hold one (they reorder or hide
#: what an operator reads in a list, a log or a URL), and what is shown to an operator escapes them.
HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def is_blank(text: str) -> bool:
    """True if `text` shows nothing: only whitespace, separators and format characters."""
    return all(c.isspace() or unicodedata.category(c) in _BLANK for c in text)


def hidden_character(text: str) -> int | None:
    """The position of the first control, format or line/paragraph separator character in `text`
    (HIDDEN_CATEGORIES), or None: what no identifier or branch name may hold."""
    if text.isascii() and text.isprintable():  # the common case, without a per-character lookup
        return None
    return next((i for i, c in enumerate(text) if unicodedata.category(c) in HIDDEN_CATEGORIES), None)


def identifier_problem(text: str) -> str | None:
    """Why `text` cannot be an identifier (a route id, a business key), or None: blank, a
    control, format or line separator character inside (named with its code point and position),
    or whitespace around it, or a character not in Unicode's composed form NFC (`" r-42"` and
    `"r-42"`, `"cle\u0301"` and `"clé"`, would be two ids that read the same)."""
    if is_blank(text):
        return "must not be empty"
    bad = hidden_character(text)
    if bad is not None:
        return f"contains a control, format or line separator character (U+{ord(text[bad]):04X} at position {bad})"
    if text != text.strip():
        return "must not begin or end with whitespace"
    if not text.isascii() and not unicodedata.is_normalized("NFC", text):
        composed = unicodedata.normalize("NFC", text)
        at = next((i for i, (a, b) in enumerate(zip(text, composed)) if a != b), min(len(text), len(composed)))
        return f"must be in Unicode's composed form (NFC, here {composed[:40]!r}): it differs at position {at}"
    return None


def _nonblank(value: str) -> str:
    if is_blank(value):
        raise problem("must not be empty")
    return value


def _identifier(value: str) -> str:
    found = identifier_problem(value)
    if found:
        raise problem(found)
    return value


def _in_class(chars: list[int]) -> str:
    """`chars` (sorted code points) as the inside of a regular-expression character class, in
    ranges: `\\uXXXX` escapes in the Basic Multilingual Plane (read alike by ECMA-262, Python and
    Rust), the characters themselves beyond it (no escape for them is common to the three)."""
    def one(code: int) -> str:
        return f"\\u{code:04X}" if code <= 0xFFFF else chr(code)

    parts, start = [], 0
    for i in range(1, len(chars) + 1):
        if i == len(chars) or chars[i] != chars[i - 1] + 1:
            first, last = chars[start], chars[i - 1]
            parts.append(one(first) if first == last else f"{one(first)}-{one(last)}")
            start = i
    return "".join(parts)


@functools.lru_cache(maxsize=None)
def text_patterns() -> dict[str, str]:
    """The JSON Schema `pattern`s of NonBlank and Identifier, made from this Python's Unicode
    tables (once, when a schema is first generated; surrogates left out, which JSON text cannot
    carry alone and `jsonutil.check_storable` refuses anyway):

    - `nonblank`: a character that is not blank (`is_blank`) somewhere in the text, and no NUL
      (`jsonutil.check_storable`);
    - `identifier`: the whole text, with no control, format or line separator character
      (HIDDEN_CATEGORIES), no whitespace at either end, and no character that Unicode's composed
      form NFC replaces wherever it stands (U+212B ANGSTROM SIGN). A combining sequence NFC would
      compose (`e` U+0301) is not expressible here and stays refused by `identifier_problem`;
    - `hidden` and `space`: the inside of a character class of the HIDDEN_CATEGORIES characters,
      and of the whitespace characters (`str.isspace`), for the patterns of names (branch names,
      repository paths)."""
    points = [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF]
    blank, hidden_only, hidden_or_changed, edge, space = [], [], [], [], []
    for code in points:
        c = chr(code)
        category = unicodedata.category(c)
        if c.isspace():
            space.append(code)
        if c.isspace() or category in _BLANK:
            blank.append(code)
        if category in HIDDEN_CATEGORIES:
            hidden_only.append(code)
        hidden = category in HIDDEN_CATEGORIES or unicodedata.normalize("NFC", c) != c
        if hidden:
            hidden_or_changed.append(code)
        if hidden or c.isspace():
            edge.append(code)
    inner, outer = _in_class(hidden_or_changed), _in_class(edge)
    blanks = _in_class(blank)  # the blanks before the first other character: no backtracking
    return {"nonblank": f"^[{blanks}]*[^\\u0000{blanks}][^\\u0000]*$",
            "identifier": f"^[^{outer}](?:[^{inner}]*[^{outer}])?$",
            "hidden": _in_class(hidden_only), "space": _in_class(space)}


class SchemaPattern:
    """Annotated metadata that documents a text rule in the JSON Schema: `minLength` (at least
    `min_length`) and the `pattern` that `make()` returns, called when a schema is generated
    (a pattern made from the Unicode tables costs time that an import should not pay). It edits
    the schema pydantic generates, so it composes with a Field's own keywords (`max_length`, a
    callable `json_schema_extra` such as `omittable`'s), which a `WithJsonSchema` or a dict
    `json_schema_extra` would replace or clash with."""

    def __init__(self, make: Callable[[], str], min_length: int = 1) -> None:
        self.make = make
        self.min_length = min_length

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        if self.min_length:
            target["minLength"] = max(self.min_length, target.get("minLength", 0))
        target["pattern"] = self.make()
        return schema


#: Text a database can store (`jsonutil.check_storable`): no NUL character. (A lone surrogate,
#: refused too, cannot be sent as UTF-8, and JSON Schema has no word for one sent escaped.)
NO_NUL_PATTERN = "^[^\\u0000]*$"


class _StorableKeys:
    """Annotated metadata of an object whose keys are storable text: `propertyNames` with
    NO_NUL_PATTERN (pydantic writes a key type's pattern as `patternProperties`, which lets the
    other keys through)."""

    def __get_pydantic_json_schema__(self, core_schema: Any, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        handler.resolve_ref_schema(schema)["propertyNames"] = {"pattern": NO_NUL_PATTERN}
        return schema


_StorableText = Annotated[str, SchemaPattern(lambda: NO_NUL_PATTERN, min_length=0)]
#: Any JSON value a database can store: documented as such (no NUL in a string or a key, at any
#: depth), validated as any JSON value (`check_storable` refuses the NUL before a model runs).
StorableJson = TypeAliasType("StorableJson", Union[  # type: ignore[misc]
    _StorableText, int, float, bool, None, list["StorableJson"],  # type: ignore[name-defined]
    Annotated[dict[str, "StorableJson"], _StorableKeys()]])  # type: ignore[name-defined]
#: A free-form JSON object (a workflow's input, a signal's payload, a chat's config) of StorableJson.
JsonObject = Annotated[dict[str, StorableJson], _StorableKeys()]


#: A string with something in it besides whitespace, separators and format characters ("must not
#: be empty" otherwise: a message of only U+202E is as empty as one of spaces).
NonBlank = Annotated[str, AfterValidator(_nonblank), SchemaPattern(lambda: text_patterns()["nonblank"])]
#: An identifier: not blank, no control, format or line separator character (`identifier_problem`).
Identifier = Annotated[str, AfterValidator(_identifier), SchemaPattern(lambda: text_patterns()["identifier"])]


def _id_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, str) and not is_blank(value):
        found = identifier_problem(value)
        if found:
            raise problem(found)
        return value
    raise problem("must be a non-empty string or an integer")


#: An id its producer may send as a string or an integer; kept as its text.
IdText = Annotated[str, BeforeValidator(_id_text), WithJsonSchema(
    {"anyOf": [{"type": "string", "minLength": 1}, {"type": "integer"}]})]
