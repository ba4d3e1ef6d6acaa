"""A Go text/template interpreter for the subset Ollama's prompt templates use.

Clients send Ollama templates in Go syntax (the `template` field of /api/generate, a
Modelfile's TEMPLATE), so they must render as Ollama renders them. Supported: text with
`{{- -}}` trimming, comments, fields (`.Messages`, `$.System`, `.Function.Name`),
variables (`$x := ...`, `$i, $m := range`), `if / else if / else`, `range` (with `else`),
`with`, parenthesized pipelines, `|` pipes, and the functions and, or, not, eq, ne, lt,
le, gt, ge, len, index, slice, print, printf, println, json, currentDate.
"""

from __future__ import annotations

import datetime
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TOKEN = re.compile(r"""
    (?P<ws>\s+)
  | (?P<str>"(?:[^"\\]|\\.)*")
  | (?P<raw>`[^`]*`)
  | (?P<chr>'(?:[^'\\]|\\.)')
  | (?P<num>-?\d+(?:\.\d+)?)
  | (?P<decl>:=)
  | (?P<assign>=)
  | (?P<var>\$[A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)
  | (?P<field>(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<lp>\()
  | (?P<rp>\))
  | (?P<pipe>\|)
  | (?P<comma>,)
""", re.X)


class TemplateError(ValueError):
    pass


def is_go_template(text: str) -> bool:
    """Go templates refer to fields with a leading dot; Jinja templates use {% %} blocks
    and bare names."""
    if "{%" in text:
        return False
    return bool(re.search(r"\{\{-?\s*(\.|\$|if\s|range\s|end\b|else\b|with\s|/\*)", text))


# ---- parse ------------------------------------------------------------------------------

@dataclass
class Text:
    text: str


@dataclass
class Action:
    pipeline: list  # commands
    decl: list[str] = field(default_factory=list)  # variables declared / assigned


@dataclass
class If:
    branches: list[tuple[list, list]]  # (pipeline, body)
    otherwise: list = field(default_factory=list)


@dataclass
class Range:
    pipeline: list
    variables: list[str]
    body: list
    otherwise: list = field(default_factory=list)


@dataclass
class With:
    pipeline: list
    body: list
    otherwise: list = field(default_factory=list)


def _lex(code: str) -> list[tuple[str, str]]:
    tokens, pos = [], 0
    while pos < len(code):
        m = _TOKEN.match(code, pos)
        if not m:
            raise TemplateError(f"unexpected {code[pos]!r} in action {code!r}")
        pos = m.end()
        if m.lastgroup != "ws":
            tokens.append((m.lastgroup, m.group()))
    return tokens


def _split_pieces(source: str) -> list[tuple[str, str]]:
    """("text", s) and ("action", code) pieces with trimming applied."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for m in _ACTION.finditer(source):
        text = source[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if text:
            pieces.append(("text", text))
        pieces.append(("action", m.group(2).strip()))
        trim_next = bool(m.group(3))
        pos = m.end()
    text = source[pos:]
    if trim_next:
        text = text.lstrip()
    if text:
        pieces.append(("text", text))
    for kind, text in pieces:
        if kind == "text" and "{{" in text:  # Go: every {{ opens an action
            line = source[:source.find(text)].count("\n") + text[:text.find("{{")].count("\n") + 1
            raise TemplateError(f"template: :{line}: unclosed action")
    return pieces


class _Parser:
    def __init__(self, pieces: list[tuple[str, str]]) -> None:
        self.pieces = pieces
        self.i = 0

    def parse_list(self, stops: tuple[str, ...] = ()) -> tuple[list, str | None, list]:
        nodes: list = []
        while self.i < len(self.pieces):
            kind, value = self.pieces[self.i]
            self.i += 1
            if kind == "text":
                nodes.append(Text(value))
                continue
            if value.startswith("/*"):
                continue
            tokens = _lex(value)
            if not tokens:
                continue
            head = tokens[0]
            if head == ("ident", "end") or head == ("ident", "else"):
                if head[1] not in stops:
                    raise TemplateError(f"unexpected {{{{{head[1]}}}}}")
                return nodes, head[1], tokens[1:]
            if head == ("ident", "if"):
                nodes.append(self._parse_if(tokens[1:]))
            elif head == ("ident", "range"):
                nodes.append(self._parse_range(tokens[1:]))
            elif head == ("ident", "with"):
                body, stop, rest = self.parse_list(("end", "else"))
                otherwise = self.parse_list(("end",))[0] if stop == "else" else []
                nodes.append(With(_parse_pipeline(tokens[1:]), body, otherwise))
            elif head[0] == "ident" and head[1] in ("template", "define", "block"):
                raise TemplateError(f"{{{{{head[1]}}}}} is not supported")
            else:
                nodes.append(_parse_action(tokens))
        if stops:
            raise TemplateError("unexpected EOF: missing {{end}}")
        return nodes, None, []

    def _parse_if(self, cond: list) -> If:
        node = If(branches=[])
        while True:
            body, stop, rest = self.parse_list(("end", "else"))
            node.branches.append((_parse_pipeline(cond), body))
            if stop == "end":
                return node
            if rest and rest[0] == ("ident", "if"):
                cond = rest[1:]
                continue
            node.otherwise = self.parse_list(("end",))[0]
            return node

    def _parse_range(self, tokens: list) -> Range:
        variables: list[str] = []
        if "decl" in [t[0] for t in tokens]:
            k = [t[0] for t in tokens].index("decl")
            variables = [t[1] for t in tokens[:k] if t[0] == "var"]
            tokens = tokens[k + 1:]
        body, stop, _ = self.parse_list(("end", "else"))
        otherwise = self.parse_list(("end",))[0] if stop == "else" else []
        return Range(_parse_pipeline(tokens), variables, body, otherwise)


def _parse_action(tokens: list) -> Action:
    kinds = [t[0] for t in tokens]
    for op in ("decl", "assign"):
        if op in kinds[:3]:
            k = kinds.index(op)
            names = [t[1] for t in tokens[:k] if t[0] == "var"]
            return Action(_parse_pipeline(tokens[k + 1:]), names)
    return Action(_parse_pipeline(tokens))


def _parse_pipeline(tokens: list) -> list:
    """A pipeline: a list of commands; a command: a list of operands."""
    commands: list[list] = [[]]
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "pipe":
            commands.append([])
        elif kind == "lp":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                depth += {"lp": 1, "rp": -1}.get(tokens[j][0], 0)
                j += 1
            inner = _parse_pipeline(tokens[i + 1:j - 1])
            operand: Any = ("pipeline", inner)
            if j < len(tokens) and tokens[j][0] == "field" and tokens[j][1] != ".":
                operand = ("chain", inner, tokens[j][1][1:].split("."))
                j += 1
            commands[-1].append(operand)
            i = j
            continue
        else:
            commands[-1].append((kind, value))
        i += 1
    if not commands[0]:
        raise TemplateError("missing value in pipeline")
    return commands


def parse(source: str) -> list:
    return _Parser(_split_pieces(source)).parse_list()[0]


# ---- execute ----------------------------------------------------------------------------

class _Cut(Exception):
    """Raised at the first .Response in a template's last turn: Ollama drops what follows."""


def truthy(v: Any) -> bool:
    if v is None or v is False:
        return False
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v != 0
    if isinstance(v, (str, list, tuple, dict)):
        return len(v) > 0
    return True


class GoStruct:
    """A JSON object seen as one of Ollama's Go structs (api.Tool, api.ToolFunction, ...): its
    fields by their Go names (`.Function.Name`), printed by `{{ . }}` as its JSON, as the
    structs' String() methods do. `fields` maps a Go name to the JSON key and, for a nested
    struct, its own fields."""

    def __init__(self, value: dict[str, Any], fields: dict[str, tuple[str, dict | None]]) -> None:
        self.value = value
        self.fields = fields

    def get(self, name: str) -> Any:
        key, nested = self.fields.get(name, (None, None))
        if key is None:
            return None
        item = self.value.get(key)
        return GoStruct(item, nested) if nested is not None and isinstance(item, dict) else item

    def __str__(self) -> str:
        return json.dumps(self.value, separators=(",", ":"), ensure_ascii=False, default=_struct_json)

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self.value)


def _struct_json(value: Any) -> Any:
    if isinstance(value, GoStruct):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON")


def _go_map(value: Any) -> Any:
    """A JSON object that Go templates see as a map but print as JSON (tool-call arguments)."""
    return GoStruct(value, {}) if isinstance(value, dict) else value


_PARAMETERS = {"Type": ("type", None), "Defs": ("$defs", None), "Items": ("items", None),
               "Required": ("required", None), "Properties": ("properties", None)}
_TOOL_FUNCTION = {"Name": ("name", None), "Description": ("description", None), "Parameters": ("parameters",
                                                                                             _PARAMETERS)}
_TOOL = {"Type": ("type", None), "Items": ("items", None), "Function": ("function", _TOOL_FUNCTION)}


def to_go_tool(tool: dict[str, Any]) -> GoStruct:
    return GoStruct(tool, _TOOL)


def _field(value: Any, name: str) -> Any:
    if isinstance(value, GoStruct):
        return value.get(name)
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def _go_str(v: Any) -> str:
    if v is None:
        return "<no value>"
    if isinstance(v, GoStruct):
        return str(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return "[" + " ".join(_go_str(x) for x in v) + "]"
    if isinstance(v, dict):
        return "map[" + " ".join(f"{k}:{_go_str(x)}" for k, x in v.items()) + "]"
    if isinstance(v, float) and v == int(v):
        return str(int(v))
    return str(v)


def _printf(fmt: str, *args: Any) -> str:
    out, it = [], iter(args)

    def sub(m: re.Match) -> str:
        verb = m.group(0)
        if verb == "%%":
            return "%"
        arg = next(it, None)
        if verb in ("%q",):
            return json.dumps(_go_str(arg))
        if verb == "%d":
            return str(int(arg or 0))
        return _go_str(arg)

    out.append(re.sub(r"%[-+ #0]*\d*(?:\.\d+)?[a-zA-Z%]", sub, fmt))
    return "".join(out)


def _cmp(op: Callable[[Any, Any], bool]) -> Callable[..., bool]:
    return lambda a, b: op(a, b)


FUNCS: dict[str, Callable[..., Any]] = {
    "not": lambda v: not truthy(v),
    "eq": lambda a, *bs: any(a == b for b in bs),
    "ne": lambda a, b: a != b,
    "lt": _cmp(lambda a, b: a < b),
    "le": _cmp(lambda a, b: a <= b),
    "gt": _cmp(lambda a, b: a > b),
    "ge": _cmp(lambda a, b: a >= b),
    "len": lambda v: len(v or ()),
    "index": lambda v, *keys: _index(v, keys),
    "slice": lambda v, *ix: v[ix[0]:ix[1]] if len(ix) > 1 else v[ix[0]:] if ix else v,
    "print": lambda *a: "".join(_go_str(x) for x in a),
    "println": lambda *a: " ".join(_go_str(x) for x in a) + "\n",
    "printf": _printf,
    "json": lambda v: json.dumps(v, separators=(",", ":"), ensure_ascii=False, default=_struct_json),
    "currentDate": lambda: datetime.date.today().isoformat(),
    "html": lambda v: _go_str(v),
}


def _index(v: Any, keys: tuple) -> Any:
    for k in keys:
        v = v[k] if isinstance(v, (list, tuple)) else _field(v, k)
    return v


class _Exec:
    def __init__(self, root: Any, cut_at_response: bool) -> None:
        self.root = root
        self.out: list[str] = []
        self.scopes: list[dict[str, Any]] = [{"$": root}]
        self.cut_at_response = cut_at_response

    def var(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise TemplateError(f"undefined variable {name!r}")

    def set_var(self, name: str, value: Any, declare: bool) -> None:
        if declare:
            self.scopes[-1][name] = value
            return
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise TemplateError(f"undefined variable {name!r}")

    def operand(self, op: Any, dot: Any) -> Any:
        kind = op[0]
        if kind == "field":
            if op[1] == ".":
                return dot
            names = op[1][1:].split(".")
            if self.cut_at_response and "Response" in names:
                raise _Cut
            v = dot
            for n in names:
                v = _field(v, n)
            return v
        if kind == "var":
            parts = op[1].split(".")
            v = self.var(parts[0])
            for n in parts[1:]:
                v = _field(v, n)
            return v
        if kind == "str":
            return json.loads(op[1])
        if kind == "raw":
            return op[1][1:-1]
        if kind == "chr":
            return ord(json.loads('"' + op[1][1:-1] + '"'))
        if kind == "num":
            return float(op[1]) if "." in op[1] else int(op[1])
        if kind == "ident":
            if op[1] in ("true", "false"):
                return op[1] == "true"
            if op[1] == "nil":
                return None
            if op[1] in FUNCS or op[1] in ("and", "or"):
                return self.call(op[1], [], dot)
            raise TemplateError(f'function "{op[1]}" not defined')
        if kind == "pipeline":
            return self.pipeline(op[1], dot)
        if kind == "chain":
            v = self.pipeline(op[1], dot)
            for n in op[2]:
                v = _field(v, n)
            return v
        raise TemplateError(f"unexpected {op!r}")

    def call(self, name: str, args: list, dot: Any, piped: tuple = ()) -> Any:
        if name == "and":  # short-circuit, returning the deciding value as Go does
            v = None
            for a in args:
                v = self.operand(a, dot)
                if not truthy(v):
                    return v
            return piped[0] if piped and truthy(v) else v
        if name == "or":
            v = None
            for a in args:
                v = self.operand(a, dot)
                if truthy(v):
                    return v
            return piped[0] if piped else v
        if name not in FUNCS:
            raise TemplateError(f'function "{name}" not defined')
        return FUNCS[name](*[self.operand(a, dot) for a in args], *piped)

    def command(self, cmd: list, dot: Any, piped: tuple = ()) -> Any:
        head = cmd[0]
        if head[0] == "ident" and head[1] not in ("true", "false", "nil"):
            return self.call(head[1], cmd[1:], dot, piped)
        if len(cmd) > 1 or piped:
            raise TemplateError("can't give argument to non-function")
        return self.operand(head, dot)

    def pipeline(self, commands: list, dot: Any) -> Any:
        value = self.command(commands[0], dot)
        for cmd in commands[1:]:
            value = self.command(cmd, dot, (value,))
        return value

    def run(self, nodes: list, dot: Any) -> None:
        for node in nodes:
            if isinstance(node, Text):
                self.out.append(node.text)
            elif isinstance(node, Action):
                value = self.pipeline(node.pipeline, dot)
                if node.decl:
                    self.set_var(node.decl[0], value, True)
                else:
                    self.out.append(_go_str(value))
            elif isinstance(node, If):
                for cond, body in node.branches:
                    if truthy(self.pipeline(cond, dot)):
                        self.block(body, dot)
                        break
                else:
                    self.block(node.otherwise, dot)
            elif isinstance(node, With):
                value = self.pipeline(node.pipeline, dot)
                self.block(node.body if truthy(value) else node.otherwise, value if truthy(value) else dot)
            elif isinstance(node, Range):
                items = self.pipeline(node.pipeline, dot)
                pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items or ()))
                if not pairs:
                    self.block(node.otherwise, dot)
                for key, item in pairs:
                    self.scopes.append({})
                    if len(node.variables) == 1:
                        self.scopes[-1][node.variables[0]] = item
                    elif len(node.variables) == 2:
                        self.scopes[-1][node.variables[0]] = key
                        self.scopes[-1][node.variables[1]] = item
                    try:
                        self.run(node.body, item)
                    finally:
                        self.scopes.pop()

    def block(self, nodes: list, dot: Any) -> None:
        self.scopes.append({})
        try:
            self.run(nodes, dot)
        finally:
            self.scopes.pop()


def render(source: str | list, values: dict[str, Any], cut_at_response: bool = False) -> str:
    nodes = parse(source) if isinstance(source, str) else source
    ex = _Exec(values, cut_at_response)
    try:
        ex.run(nodes, values)
    except _Cut:
        pass
    except (TypeError, KeyError, IndexError, AttributeError) as exc:
        raise TemplateError(f"template: {exc}") from None
    return "".join(ex.out)


def uses_field(source: str, name: str) -> bool:
    return re.search(r"\.\s*" + re.escape(name) + r"\b", source) is not None


def to_go_message(m: dict[str, Any]) -> dict[str, Any]:
    """A message as Ollama's templates see it (Go field names)."""
    calls = [{"Function": {"Name": (tc.get("function") or {}).get("name", ""),
                           "Arguments": _go_map((tc.get("function") or {}).get("arguments", {})),
                           "Index": (tc.get("function") or {}).get("index", 0)},
              "ID": tc.get("id", "")} for tc in m.get("tool_calls") or ()]
    return {"Role": m.get("role", ""), "Content": m.get("content", ""), "Thinking": m.get("thinking", ""),
            "Images": m.get("images") or [], "ToolCalls": calls, "ToolName": m.get("tool_name", ""),
            "ToolCallID": m.get("tool_call_id", "")}


def render_messages(source: str, messages: list[dict[str, Any]], *, tools: list | None = None,
                    think: bool = False, think_level: str = "", is_think_set: bool = False) -> str:
    """Ollama's Template.Execute for a chat: one pass over .Messages when the template uses
    them; otherwise one execution per (system, prompt, response) turn, the last cut at its
    .Response."""
    extra = {"Tools": [to_go_tool(t) for t in tools or ()], "Think": think, "ThinkLevel": think_level, "IsThinkSet": is_think_set}
    system = "\n\n".join(m["content"] for m in messages if m.get("role") == "system")
    rest = [m for m in messages if m.get("role") != "system"]
    nodes = parse(source)
    if uses_field(source, "Messages"):
        go = [to_go_message(m) for m in rest]
        return render(nodes, {"System": system, "Messages": go, "Response": "", **extra})
    out: list[str] = []
    prompt = response = ""
    turn_system = ""
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        if role == "system":
            if prompt or response:
                out.append(render(nodes, {"System": turn_system, "Prompt": prompt, "Response": response, **extra}))
                turn_system, prompt, response = "", "", ""
            turn_system = content
        elif role == "user":
            if response:
                out.append(render(nodes, {"System": turn_system, "Prompt": prompt, "Response": response, **extra}))
                turn_system, prompt, response = "", "", ""
            prompt = content
        elif role == "assistant":
            response = content
    out.append(render(nodes, {"System": turn_system, "Prompt": prompt, "Response": response, **extra},
                      cut_at_response=True))
    return "".join(out)
