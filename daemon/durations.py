"""Go's time.ParseDuration and Ollama's keep_alive rules.

keep_alive (Go api.Duration.UnmarshalJSON): a JSON number is seconds (fractions allowed), a
string is a Go duration ("10m", "1h30m", "300ms", "-1m", "0"); anything negative means
forever. A bare number in a string other than "0" is an error, exactly as in Go:
`time: missing unit in duration "-1"`.
"""

from __future__ import annotations

import math
import re

from daemon.errors import BadRequest

# Go's time.Duration is int64 nanoseconds; "forever" is its maximum.
FOREVER_NS = 2**63 - 1

_UNIT_NS = {
    "ns": 1,
    "us": 1_000,
    "µs": 1_000,  # U+00B5 micro sign
    "μs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}
_COMPONENT = re.compile(r"(\d*)(\.\d*)?([^\d.]*)")


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_go_duration(text: str) -> int:
    """Parse a Go duration string into nanoseconds, with Go's error messages."""
    original = text
    s = text
    sign = 1
    if s[:1] in ("-", "+"):
        sign = -1 if s[0] == "-" else 1
        s = s[1:]
    if s == "0":
        return 0
    if s == "":
        raise ValueError(f"time: invalid duration {_quote(original)}")
    total = 0.0
    while s:
        m = _COMPONENT.match(s)
        whole, frac, unit = m.group(1), m.group(2), m.group(3)
        if not whole and (not frac or frac == "."):
            raise ValueError(f"time: invalid duration {_quote(original)}")
        if not unit:
            raise ValueError(f"time: missing unit in duration {_quote(original)}")
        # the unit runs until the next digit or dot
        if unit not in _UNIT_NS:
            raise ValueError(f"time: unknown unit {_quote(unit)} in duration {_quote(original)}")
        value = float((whole or "0") + (frac or ""))
        total += value * _UNIT_NS[unit]
        s = s[m.end():]
    if total > FOREVER_NS:
        raise ValueError(f"time: invalid duration {_quote(original)}")
    return sign * int(total)


def parse_keep_alive(value: object) -> int | None:
    """A request's keep_alive in nanoseconds (FOREVER_NS for negative), None when absent.

    Raises BadRequest with Go's texts for a bad string or an unsupported JSON type."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRequest("Unsupported type: 'bool'")
    if isinstance(value, (int, float)):
        if value < 0:
            return FOREVER_NS
        if math.isinf(value) or value * 1e9 > FOREVER_NS:
            return FOREVER_NS
        return int(value * 1_000_000_000)
    if isinstance(value, str):
        try:
            ns = parse_go_duration(value)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return FOREVER_NS if ns < 0 else ns
    go_type = {dict: "map[string]interface {}", list: "[]interface {}"}.get(type(value), type(value).__name__)
    raise BadRequest(f"Unsupported type: '{go_type}'")


def parse_keep_alive_env(text: str, default_ns: int) -> int:
    """OLLAMA_KEEP_ALIVE: a Go duration or an integer number of seconds; < 0 is forever."""
    if not text:
        return default_ns
    try:
        ns = parse_go_duration(text)
    except ValueError:
        try:
            ns = int(text) * 1_000_000_000
        except ValueError:
            ns = default_ns
    return FOREVER_NS if ns < 0 else ns


def format_duration(ns: int) -> str:
    """Human form for logs and the CLI ("5m0s"-like, "forever")."""
    if ns >= FOREVER_NS:
        return "forever"
    seconds = ns / 1e9
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, sec = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (f"{hours}h" if hours else "") + f"{minutes}m{sec}s"
