"""Ollama's Modelfile syntax, for `hfollama create -f Modelfile`:

    # comment
    FROM llama3            (a model name, or a path to a .gguf file or an HF folder)
    PARAMETER temperature 0.2
    PARAMETER stop "<|eot_id|>"
    SYSTEM \"\"\"You are ...\"\"\"
    TEMPLATE \"\"\"{{ .Prompt }}\"\"\"
    MESSAGE user Hello
    LICENSE \"\"\"...\"\"\"

Commands are case-insensitive; values may be bare, "quoted" or \"\"\"multi-line\"\"\".
The result is the body of an /api/create request (without files, which the CLI uploads).
"""

from __future__ import annotations

import json
from typing import Any

from daemon.api.options import OPTION_TYPES, OptionRangeError, OptionTypeError, coerce_option

COMMANDS = ("from", "parameter", "system", "template", "message", "license", "adapter", "requires")


class ModelfileSyntaxError(ValueError):
    def __init__(self, line: int, problem: str) -> None:
        super().__init__(f"line {line}: {problem}")
        self.line, self.problem = line, problem


def _value(text: str, pos: int, line: int) -> tuple[str, int]:
    """The value starting at text[pos]: bare to the end of the line, or quoted."""
    if text.startswith('"""', pos):
        end = text.find('"""', pos + 3)
        if end < 0:
            raise ModelfileSyntaxError(line, 'unterminated """')
        return text[pos + 3:end], end + 3
    if text.startswith('"', pos):
        end = pos + 1
        while end < len(text) and text[end] != '"':
            end += 2 if text[end] == "\\" else 1
        if end >= len(text):
            raise ModelfileSyntaxError(line, 'unterminated "')
        return json.loads(text[pos:end + 1]), end + 1
    end = text.find("\n", pos)
    end = len(text) if end < 0 else end
    return text[pos:end].strip(), end


def parse(text: str) -> dict[str, Any]:
    body: dict[str, Any] = {}
    parameters: dict[str, Any] = {}
    messages: list[dict[str, str]] = []
    pos = 0
    while pos < len(text):
        line = text.count("\n", 0, pos) + 1
        while pos < len(text) and text[pos] in " \t\r\n":
            pos += 1
        if pos >= len(text):
            break
        if text[pos] == "#":
            pos = text.find("\n", pos)
            pos = len(text) if pos < 0 else pos
            continue
        word_end = pos
        while word_end < len(text) and not text[word_end].isspace():
            word_end += 1
        command = text[pos:word_end].lower()
        line = text.count("\n", 0, pos) + 1
        if command not in COMMANDS:
            raise ModelfileSyntaxError(line, f"unknown command {text[pos:word_end]!r}")
        pos = word_end
        while pos < len(text) and text[pos] in " \t":
            pos += 1
        if command in ("parameter", "message"):
            key_end = pos
            while key_end < len(text) and not text[key_end].isspace():
                key_end += 1
            key = text[pos:key_end]
            pos = key_end
            while pos < len(text) and text[pos] in " \t":
                pos += 1
            value, pos = _value(text, pos, line)
            if command == "message":
                if key.lower() not in ("system", "user", "assistant", "tool"):
                    raise ModelfileSyntaxError(line, f"invalid message role {key!r}")
                messages.append({"role": key.lower(), "content": value})
            else:
                _add_parameter(parameters, key.lower(), value, line)
            continue
        value, pos = _value(text, pos, line)
        if command == "from":
            body["from"] = value
        elif command == "adapter":
            raise ModelfileSyntaxError(line, "ADAPTER is not supported")
        elif command != "requires":
            body[command] = value
    if "from" not in body:
        raise ModelfileSyntaxError(1, "no FROM line")
    if parameters:
        body["parameters"] = parameters
    if messages:
        body["messages"] = messages
    return body


def _add_parameter(parameters: dict[str, Any], key: str, raw: str, line: int) -> None:
    if key not in OPTION_TYPES:
        raise ModelfileSyntaxError(line, f"unknown parameter {key!r}")
    kind = OPTION_TYPES[key]
    try:
        if kind == "[]string":
            parameters.setdefault(key, []).append(raw)
            return
        value: Any = {"int": lambda v: int(float(v)), "float32": float,
                      "bool": lambda v: {"true": True, "false": False}[v.lower()]}[kind](raw)
        parameters[key] = coerce_option(key, value)
    except (ValueError, KeyError, OverflowError, OptionTypeError, OptionRangeError):
        raise ModelfileSyntaxError(line, f"invalid value {raw!r} for parameter {key}") from None
