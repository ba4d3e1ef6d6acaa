"""Ollama's `options` (Modelfile PARAMETER, /api/create `parameters`): names, types, defaults.

Precedence: built-in defaults < the model's parameters < the request's options. Unknown keys
(including the removed ones clients still send: mirostat, tfs_z, numa, ...) are ignored.
A value of the wrong type is a 500 with Go's text, `option "temperature" must be of type
float32`, because that is what Ollama answers. A number that Go's int64 or float32 cannot
hold (`top_k: 2**63`) is a 400 with encoding/json's text: it is a client's mistake, and
it must never reach the sampler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

from daemon.errors import BadRequest, InternalError

log = logging.getLogger(__name__)

# name -> Go type of api.Options
OPTION_TYPES: dict[str, str] = {
    "num_keep": "int",
    "seed": "int",
    "num_predict": "int",
    "top_k": "int",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "repeat_last_n": "int",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "[]string",
    # runner options: fixed when the model loads
    "num_ctx": "int",
    "num_batch": "int",
    "num_gpu": "int",
    "main_gpu": "int",
    "use_mmap": "bool",
    "num_thread": "int",
}

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
FLOAT32_MAX = 3.4028234663852886e38
# Ollama's runner raises a smaller num_ctx to 4: a context must hold a prompt token and an answer.
MIN_NUM_CTX = 4


class OptionTypeError(InternalError):
    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


class OptionRangeError(BadRequest):
    def __init__(self, key: str, value: Any, go_type: str) -> None:
        super().__init__(f"json: cannot unmarshal number {value} into Go struct field Options.{key} of type {go_type}")
        self.key = key


def coerce_option(key: str, value: Any) -> Any:
    """One option value converted as Go's Options.FromMap does; raises OptionTypeError for a
    wrong type, OptionRangeError for a number the Go type cannot hold."""
    go_type = OPTION_TYPES[key]
    if go_type == "int":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionTypeError(key, f'option "{key}" must be of type integer')
        if not INT64_MIN <= value <= INT64_MAX:
            raise OptionRangeError(key, value, "int")
        return int(value)
    if go_type == "float32":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionTypeError(key, f'option "{key}" must be of type float32')
        if abs(value) > FLOAT32_MAX:
            raise OptionRangeError(key, value, "float32")
        return float(value)
    if go_type == "bool":
        if not isinstance(value, bool):
            raise OptionTypeError(key, f'option "{key}" must be of type boolean')
        return value
    # []string (tuples: our own already-parsed layers)
    if not isinstance(value, (list, tuple)):
        raise OptionTypeError(key, f'option "{key}" must be of type array')
    if not all(isinstance(v, str) for v in value):
        raise OptionTypeError(key, f'option "{key}" must be of an array of strings')
    return tuple(value)


def parse_options(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """Known keys with typed values; unknown keys dropped, null values skipped."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        if key not in OPTION_TYPES:
            log.debug("ignoring unknown option %r", key)
            continue
        if value is None:
            continue
        out[key] = coerce_option(key, value)
    return out


@dataclass(frozen=True)
class Options:
    """Every option with Ollama's default. num_ctx 0 means "the daemon's default"."""

    num_keep: int = 4
    seed: int = -1
    num_predict: int = -1
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_last_n: int = 64
    temperature: float = 0.8
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    num_ctx: int = 0
    num_batch: int = 512
    num_gpu: int = -1
    main_gpu: int = 0
    use_mmap: bool | None = None
    num_thread: int = 0

    @classmethod
    def layered(cls, *layers: Mapping[str, Any] | None) -> "Options":
        """Defaults, then each layer of raw options in turn (later layers win)."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(parse_options(layer))
        num_ctx = merged.get("num_ctx", 0)
        if num_ctx <= 0:  # unset, zero or negative: the daemon's default, never a tiny context
            merged["num_ctx"] = 0
        else:
            merged["num_ctx"] = max(MIN_NUM_CTX, num_ctx)
        return replace(cls(), **merged)

    def explicit(self) -> dict[str, Any]:
        """The options that differ from the defaults, in Ollama's parameter order."""
        default = Options()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}
