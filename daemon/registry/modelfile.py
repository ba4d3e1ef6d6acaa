"""YAML modelfiles: one file per model family, tags -> how to get and run the model.

    family: llama3                      # optional; defaults to the file name
    defaults:                           # optional; merged under every tag
      parameters: {temperature: 0.6}
    tags:
      8b-instruct:
        source: {repo: meta-llama/Meta-Llama-3-8B-Instruct, revision: main}
        quantization: {mode: nf4, double_quant: true, compute_dtype: bfloat16}
        parameters: {top_p: 0.9, stop: ["<|eot_id|>"]}   # Ollama option names
        system: "..."                   # default system prompt
        template: "..."                 # Jinja chat template (or an Ollama Go template);
                                        # default: the tokenizer's own
        stop: ["..."]                   # shorthand for parameters.stop
        license: "..."
        messages: [{role: user, content: ...}]
        fim: {prefix: "<fim_prefix>", suffix: "<fim_suffix>", middle: "<fim_middle>"}
        tool_parser: llama3             # tool-call syntax: hermes | mistral | llama3
                                        # (default: recognized from the template)
      instruct: {alias: 8b-instruct}

A source is one of: `repo` (+ `revision`, optional `gguf` file in the repo), `package` +
`file` (a file or folder inside an installed Python package, found without importing it),
or `path` (a local HF folder or .gguf file). Errors name the file, the key and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from daemon.api.options import OPTION_TYPES, OptionRangeError, OptionTypeError, coerce_option
from daemon.store import pathnames
from daemon.engine.output import DIALECTS as TOOL_PARSERS
from daemon.names import ModelName
QUANT_MODES = ("none", "nf4", "fp4", "int8")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "f16": "float16", "fp32": "float32", "f32": "float32"}
_TAG_KEYS = {"source", "quantization", "parameters", "system", "template", "stop", "license",
             "messages", "fim", "description", "alias", "tool_parser"}



class ModelfileError(ValueError):
    def __init__(self, file: str, key: str, problem: str) -> None:
        super().__init__(f"{file}: {key}: {problem}")
        self.file, self.key, self.problem = file, key, problem


@dataclass(frozen=True)
class Source:
    kind: str  # "repo" | "package" | "path"
    repo: str | None = None
    revision: str = "main"
    gguf: str | None = None  # a GGUF file inside the repo / package folder
    package: str | None = None
    file: str | None = None
    path: str | None = None

    def describe(self) -> str:
        if self.kind == "repo":
            return f"hf.co/{self.repo}" + (f" ({self.gguf})" if self.gguf else "") + (
                f"@{self.revision}" if self.revision != "main" else "")
        if self.kind == "package":
            return f"package {self.package}/{self.file}"
        return str(self.path)


@dataclass(frozen=True)
class Quantization:
    mode: str = "none"
    double_quant: bool = False
    compute_dtype: str = "auto"

    @property
    def label(self) -> str | None:
        """Ollama's quantization_level for a model quantized on load."""
        return {"nf4": "NF4", "fp4": "FP4", "int8": "INT8"}.get(self.mode)


@dataclass(frozen=True)
class Fim:
    prefix: str
    suffix: str
    middle: str


@dataclass(frozen=True)
class Modelfile:
    """Everything the daemon knows about one name before touching its files."""

    name: ModelName
    source: Source
    quantization: Quantization = Quantization()
    parameters: Mapping[str, Any] = field(default_factory=dict)  # typed, Ollama names
    system: str = ""
    template: str | None = None
    license: str = ""
    messages: tuple[Mapping[str, str], ...] = ()
    fim: Fim | None = None
    tool_parser: str | None = None
    description: str = ""
    origin: str = ""  # the YAML file it came from
    alias_of: str | None = None  # set on alias tags: they resolve but are not listed

    def with_overrides(self, **changes: Any) -> "Modelfile":
        return replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """How it runs, as stored in a manifest."""
        return {
            "quantization": {"mode": self.quantization.mode, "double_quant": self.quantization.double_quant,
                             "compute_dtype": self.quantization.compute_dtype},
            "parameters": {k: list(v) if isinstance(v, tuple) else v for k, v in self.parameters.items()},
            "system": self.system,
            "template": self.template,
            "license": self.license,
            "messages": [dict(m) for m in self.messages],
            "fim": None if self.fim is None else {"prefix": self.fim.prefix, "suffix": self.fim.suffix,
                                                  "middle": self.fim.middle},
            "tool_parser": self.tool_parser,
        }

    @classmethod
    def from_settings(cls, name: ModelName, source: Source, settings: Mapping[str, Any], origin: str = "") -> "Modelfile":
        """The inverse of `settings()`, validated like a YAML tag."""
        return parse_tag(origin or "manifest", name.model, name.tag, {
            "source": source_to_json(source),
            **{k: v for k, v in settings.items() if v is not None and k != "parameters"},
            "parameters": settings.get("parameters") or {},
        }).with_overrides(name=name)


def _err(file: str, key: str, problem: str) -> ModelfileError:
    return ModelfileError(file, key, problem)


def source_to_json(source: Source) -> dict[str, str]:
    keys = {"repo": ("repo", "revision", "gguf"), "package": ("package", "file"), "path": ("path", "gguf")}
    return {k: getattr(source, k) for k in keys[source.kind] if getattr(source, k)}


def source_from_json(raw: Mapping[str, Any]) -> Source:
    """A manifest's source; created models ("files") are a local folder of the store."""
    kind = raw["kind"] if raw["kind"] in ("repo", "package", "path") else "path"
    return Source(kind=kind, repo=raw.get("repo"), revision=raw.get("revision", "main"), gguf=raw.get("gguf"),
                  package=raw.get("package"), file=raw.get("file"),
                  path=raw.get("path") or (f"files/{raw['id']}" if "id" in raw else None))


def parse_source(file: str, key: str, raw: Any) -> Source:
    if not isinstance(raw, Mapping):
        raise _err(file, key, "must be a mapping with one of repo, package or path")
    kinds = [k for k in ("repo", "package", "path") if k in raw]
    if len(kinds) != 1:
        raise _err(file, key, "needs exactly one of repo, package or path")
    unknown = set(raw) - {"repo", "revision", "gguf", "package", "file", "path"}
    if unknown:
        raise _err(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
    for k, v in raw.items():
        if not isinstance(v, str) or not v:
            raise _err(file, f"{key}.{k}", "must be a non-empty string")
    kind = kinds[0]
    # names that become paths in the store (hub cache folders, refs, snapshot files)
    for name, check in (("repo", pathnames.repo_id), ("revision", pathnames.revision),
                        ("gguf", pathnames.relative_path)):
        if name in raw and kind == "repo":
            try:
                check(raw[name])
            except pathnames.UnsafeName as exc:
                raise _err(file, f"{key}.{name}", exc.message) from None
    if kind == "package" and "file" not in raw:
        raise _err(file, f"{key}.file", "required with package")
    return Source(kind=kind, repo=raw.get("repo"), revision=raw.get("revision", "main"), gguf=raw.get("gguf"),
                  package=raw.get("package"), file=raw.get("file"), path=raw.get("path"))


def parse_quantization(file: str, key: str, raw: Any) -> Quantization:
    if raw is None:
        return Quantization()
    if isinstance(raw, str):
        raw = {"mode": raw}
    if not isinstance(raw, Mapping):
        raise _err(file, key, "must be a mode (none, nf4, fp4, int8) or a mapping")
    unknown = set(raw) - {"mode", "double_quant", "compute_dtype"}
    if unknown:
        raise _err(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
    mode = str(raw.get("mode", "none")).lower()
    if mode not in QUANT_MODES:
        raise _err(file, f"{key}.mode", f"{mode!r} is not one of {', '.join(QUANT_MODES)}")
    double = raw.get("double_quant", False)
    if not isinstance(double, bool):
        raise _err(file, f"{key}.double_quant", "must be true or false")
    if double and mode not in ("nf4", "fp4"):
        raise _err(file, f"{key}.double_quant", "applies to nf4 and fp4 only")
    dtype = str(raw.get("compute_dtype", "auto")).lower()
    dtype = _DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in COMPUTE_DTYPES:
        raise _err(file, f"{key}.compute_dtype", f"{dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
    return Quantization(mode=mode, double_quant=double, compute_dtype=dtype)


def parse_parameters(file: str, key: str, raw: Any) -> dict[str, Any]:
    """Ollama option names with values of the right type (YAML scalars)."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise _err(file, key, "must be a mapping of Ollama option names to values")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if name not in OPTION_TYPES:
            raise _err(file, f"{key}.{name}", "unknown option")
        if name == "stop" and isinstance(value, str):
            value = [value]
        try:
            out[name] = coerce_option(name, value)
        except (OptionTypeError, OptionRangeError) as exc:
            raise _err(file, f"{key}.{name}", exc.message) from None
    return out


def _string(file: str, key: str, raw: Any) -> str:
    if raw is None:
        return ""
    if isinstance(raw, list) and key.endswith("license"):
        raw = "\n".join(str(x) for x in raw)
    if not isinstance(raw, str):
        raise _err(file, key, "must be a string")
    return raw


def _parse_messages(file: str, key: str, raw: Any) -> tuple[Mapping[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _err(file, key, "must be a list of {role, content}")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content", ""), str):
            raise _err(file, f"{key}[{i}]", "must be a mapping with string role and content")
        out.append({"role": m["role"].lower(), "content": m.get("content", "")})
    return tuple(out)


def _parse_fim(file: str, key: str, raw: Any) -> Fim | None:
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or not all(isinstance(raw.get(k), str) for k in ("prefix", "suffix", "middle")):
        raise _err(file, key, "must have string prefix, suffix and middle tokens")
    return Fim(prefix=raw["prefix"], suffix=raw["suffix"], middle=raw["middle"])


def _merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if k == "parameters" and isinstance(out.get(k), Mapping) and isinstance(v, Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def parse_tag(file: str, family: str, tag: str, raw: Mapping[str, Any]) -> Modelfile:
    key = f"tags.{tag}"
    unknown = set(raw) - _TAG_KEYS
    if unknown:
        raise _err(file, f"{key}.{sorted(unknown)[0]}", "unknown key")
    if "source" not in raw:
        raise _err(file, f"{key}.source", "required")
    parameters = parse_parameters(file, f"{key}.parameters", raw.get("parameters"))
    if raw.get("stop") is not None:
        stop = parse_parameters(file, key, {"stop": raw["stop"]})["stop"]
        parameters["stop"] = tuple(parameters.get("stop", ())) + stop
    name = ModelName.parse(f"{family}:{tag}")
    if not name.is_valid:
        raise _err(file, key, f"{family}:{tag} is not a valid model name")
    template = raw.get("template")
    if template is not None and not isinstance(template, str):
        raise _err(file, f"{key}.template", "must be a string")
    tool_parser = raw.get("tool_parser")
    if tool_parser is not None and tool_parser not in TOOL_PARSERS:
        raise _err(file, f"{key}.tool_parser", f"must be one of {', '.join(TOOL_PARSERS)}")
    return Modelfile(
        name=name,
        source=parse_source(file, f"{key}.source", raw["source"]),
        quantization=parse_quantization(file, f"{key}.quantization", raw.get("quantization")),
        parameters=parameters,
        system=_string(file, f"{key}.system", raw.get("system")),
        template=template or None,
        license=_string(file, f"{key}.license", raw.get("license")),
        messages=_parse_messages(file, f"{key}.messages", raw.get("messages")),
        fim=_parse_fim(file, f"{key}.fim", raw.get("fim")),
        tool_parser=tool_parser,
        description=_string(file, f"{key}.description", raw.get("description")),
        origin=file,
    )


def parse_family(file: str, doc: Any, default_family: str) -> dict[str, Modelfile]:
    """All tags of one YAML document, aliases resolved; keyed by lower-cased tag."""
    if not isinstance(doc, Mapping):
        raise _err(file, "(top level)", "must be a mapping with a `tags` key")
    unknown = set(doc) - {"family", "defaults", "tags", "description"}
    if unknown:
        raise _err(file, sorted(unknown)[0], "unknown key")
    family = doc.get("family", default_family)
    if not isinstance(family, str) or not ModelName.parse(family).is_valid:
        raise _err(file, "family", f"{family!r} is not a valid model name")
    defaults = doc.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise _err(file, "defaults", "must be a mapping")
    tags = doc.get("tags")
    if not isinstance(tags, Mapping) or not tags:
        raise _err(file, "tags", "must be a non-empty mapping of tag names")
    out: dict[str, Modelfile] = {}
    aliases: dict[str, str] = {}
    for tag, raw in tags.items():
        tag = str(tag)
        if not isinstance(raw, Mapping):
            raise _err(file, f"tags.{tag}", "must be a mapping")
        if "alias" in raw:
            if set(raw) != {"alias"} or not isinstance(raw["alias"], str):
                raise _err(file, f"tags.{tag}.alias", "an alias is a tag name and nothing else")
            aliases[tag] = str(raw["alias"])
            continue
        out[tag.lower()] = parse_tag(file, family, tag, _merge(defaults, raw))
    for tag, target in aliases.items():
        seen = {tag}
        while target in aliases and target not in seen:
            seen.add(target)
            target = aliases[target]
        if target.lower() not in out:
            raise _err(file, f"tags.{tag}.alias", f"no tag {target!r} in this file")
        out[tag.lower()] = replace(out[target.lower()], name=ModelName.parse(f"{family}:{tag}"),
                                   alias_of=out[target.lower()].name.display)
    return out


def load_file(path: Path) -> dict[str, Modelfile]:
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(parse)"
        raise ModelfileError(str(path), where, f"invalid YAML: {getattr(exc, 'problem', exc)}") from None
    return parse_family(str(path), doc, path.stem)
