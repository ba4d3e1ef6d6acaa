"""Decoding JSON request bodies with the messages Go's encoding/json gives.

Clients only need a 400 with a JSON error, but matching Go's texts keeps logs and tests
comparable with Ollama's. A field spec is a Go type name: "string", "bool", "int",
"float32", "[]int", "[]string", "map[string]interface {}", "interface {}", or a nested
struct given as `Struct("Name", {...})` / `ArrayOf(Struct(...))`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Union

from daemon.errors import BadRequest


@dataclass(frozen=True)
class Struct:
    go_name: str
    fields: Mapping[str, "Spec"]


@dataclass(frozen=True)
class ArrayOf:
    item: "Spec"
    # hfollama: most items accepted (a bound on the work one request can cause); `what` names them
    max_items: int | None = None
    what: str = "items"


Spec = Union[str, Struct, ArrayOf]


def _json_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def _go_type(spec: Spec) -> str:
    if isinstance(spec, Struct):
        return f"api.{spec.go_name}"
    if isinstance(spec, ArrayOf):
        return "[]" + _go_type(spec.item)
    return spec


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Go's decoder gives up past 10,000 levels of nesting; Python's recursion stops sooner.
MAX_DEPTH = 10000


def _mismatch(value: Any, path: str, spec: Spec) -> BadRequest:
    kind = _json_kind(value)
    if kind == "number" and _go_type(spec) in ("int", "[]int") and (isinstance(value, float) or
                                                                  not INT64_MIN <= value <= INT64_MAX):
        kind = f"number {json.dumps(value)}"
    return BadRequest(f"json: cannot unmarshal {kind} into Go struct field {path} of type {_go_type(spec)}")


def _check(value: Any, spec: Spec, path: str) -> Any:
    """Validate one value against its spec; null always means "absent" (Go zero value)."""
    if value is None:
        return None
    if isinstance(spec, Struct):
        if not isinstance(value, dict):
            raise _mismatch(value, path, spec)
        return {k: _check(v, spec.fields[k], f"{path}.{k}") for k, v in value.items() if k in spec.fields}
    if isinstance(spec, ArrayOf):
        if not isinstance(value, list):
            raise _mismatch(value, path, spec)
        if spec.max_items is not None and len(value) > spec.max_items:
            raise BadRequest(f"too many {spec.what}: {len(value)} (at most {spec.max_items} are accepted)")
        return [_check(v, spec.item, path) for v in value]
    ok = {
        "string": lambda v: isinstance(v, str),
        "bool": lambda v: isinstance(v, bool),
        "int": lambda v: isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX,
        "float32": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "[]int": lambda v: isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool)
                                                   and INT64_MIN <= i <= INT64_MAX for i in v),
        "[]string": lambda v: isinstance(v, list) and all(isinstance(i, str) for i in v),
        "map[string]interface {}": lambda v: isinstance(v, dict),
        "interface {}": lambda v: True,
    }[spec]
    if not ok(value):
        if spec in ("[]int", "[]string") and isinstance(value, list):
            item_spec = spec[2:]
            bad = next(i for i in value if not ok([i]))
            raise _mismatch(bad, path, item_spec)
        raise _mismatch(value, path, spec)
    return value


def _go_syntax_error(exc: json.JSONDecodeError) -> str:
    """Translate Python's JSON error into Go's wording."""
    doc, pos = exc.doc, exc.pos
    if pos >= len(doc.rstrip()):
        return "unexpected EOF"
    char = doc[pos]
    shown = char if char.isprintable() else json.dumps(char)[1:-1]
    msg = exc.msg
    if msg.startswith("Expecting property name"):
        return f"invalid character '{shown}' looking for beginning of object key string"
    if msg.startswith("Expecting ':'"):
        return f"invalid character '{shown}' after object key"
    if msg.startswith("Expecting ',' delimiter"):
        context = "object key:value pair" if _inside_object(doc, pos) else "array element"
        return f"invalid character '{shown}' after {context}"
    if msg.startswith("Extra data"):
        return f"invalid character '{shown}' after top-level value"
    if msg.startswith("Invalid control character"):
        return f"invalid character '{shown}' in string literal"
    if msg.startswith("Unterminated string"):
        return "unexpected EOF"
    if msg.startswith("Invalid \\escape") or msg.startswith("Invalid \\u"):
        return f"invalid character '{shown}' in string escape code"
    return f"invalid character '{shown}' looking for beginning of value"


def _inside_object(doc: str, pos: int) -> bool:
    in_str = escape = False
    stack: list[str] = []
    for c in doc[:pos]:
        if in_str:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                in_str = False
            continue
        if c == '"':
            in_str = True
        elif c in "{[":
            stack.append(c)
        elif c in "}]" and stack:
            stack.pop()
    return bool(stack) and stack[-1] == "{"


class _NonFiniteLiteral(Exception):
    """NaN / Infinity: Python accepts them, Go's decoder does not."""


def _reject_constant(name: str) -> Any:
    raise _NonFiniteLiteral(name)


def decode_body(raw: bytes, struct: Struct) -> dict[str, Any]:
    """Parse a request body into a dict holding only the known, type-checked fields."""
    if not raw or not raw.strip():
        raise BadRequest("missing request body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("invalid character looking for beginning of value") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except _NonFiniteLiteral as exc:
        raise BadRequest(f"invalid character '{str(exc)[0]}' looking for beginning of value") from None
    except RecursionError:  # nested deeper than Python parses: Go's text for its own limit
        raise BadRequest("exceeded max depth") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(_go_syntax_error(exc)) from None
    if not isinstance(value, dict):
        raise BadRequest(f"json: cannot unmarshal {_json_kind(value)} into Go value of type api.{struct.go_name}")
    return _check(value, struct, struct.go_name)
