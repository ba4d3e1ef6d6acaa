"""Model names, parsed exactly as Ollama parses them (Go: types/model/name.go).

Grammar::

    name      = [ [ scheme "://" ] host "/" ] [ namespace "/" ] model [ ":" tag ] [ "@" digest ]
    host      = first ( alnum | "_" | "-" | "." | ":" )*     1..350 chars
    namespace = first ( alnum | "_" | "-" )*                 1..80 chars (no dot)
    model     = first ( alnum | "_" | "-" | "." )*           1..80 chars
    tag       = first ( alnum | "_" | "-" | "." )*           1..80 chars
    first     = alnum | "_"

The tag is split off at the last ":" only when it comes after the last "/", so
"host:5000/ns/m" keeps its port. A separator with nothing after it ("m:", "ns/") promises a
part that is missing, which makes the name invalid. Missing parts take the defaults
registry.ollama.ai / library / latest. A trailing "@digest" is accepted and ignored, as
current Ollama does. Every other form (display, lookup key, store path) derives from the
parsed parts.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_MISSING = "!MISSING!"  # a promised but empty part; never valid

_MAX_LEN = {"host": 350, "namespace": 80, "model": 80, "tag": 80}


def _is_first_char(c: str) -> bool:
    return c.isascii() and (c.isalnum() or c == "_")


def _is_valid_part(kind: str, part: str) -> bool:
    if not 1 <= len(part) <= _MAX_LEN[kind]:
        return False
    if not _is_first_char(part[0]):
        return False
    for c in part[1:]:
        if c in "_-":
            continue
        if c == ".":
            if kind == "namespace":
                return False
            continue
        if c == ":":
            if kind != "host":
                return False
            continue
        if not _is_first_char(c):
            return False
    return True


def _cut_last(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i], s[i + len(sep):], True


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    before, after, found = _cut_last(s, sep)
    if not found:
        return before, after, False
    return before or _MISSING, after or _MISSING, True


@dataclass(frozen=True)
class ModelName:
    """A model reference with its parts' case preserved; compare with `key`."""

    host: str
    namespace: str
    model: str
    tag: str
    scheme: str = "https"

    @classmethod
    def parse(cls, text: str) -> "ModelName":
        """Parse and fill defaults. The result may be invalid: check `is_valid`."""
        s = text.strip()
        # A trailing "@digest" (after the last "/") pins a digest; Ollama ignores it here.
        at = s.rfind("@")
        if at >= 0 and at > s.rfind("/"):
            s = s[:at]
        host = namespace = tag = ""
        scheme = "https"
        if s.rfind(":") > s.rfind("/"):
            s, tag, _ = _cut_promised(s, ":")
        s, model, promised = _cut_promised(s, "/")
        if not promised:
            model = s
        else:
            s, namespace, promised = _cut_promised(s, "/")
            if not promised:
                namespace = s
            else:
                if "://" in s:
                    scheme, host = s.split("://", 1)
                else:
                    host = s
        return cls(
            host=host or DEFAULT_HOST,
            namespace=namespace or DEFAULT_NAMESPACE,
            model=model,
            tag=tag or DEFAULT_TAG,
            scheme=scheme,
        )

    @property
    def is_valid(self) -> bool:
        return (
            _is_valid_part("host", self.host)
            and _is_valid_part("namespace", self.namespace)
            and _is_valid_part("model", self.model)
            and _is_valid_part("tag", self.tag)
        )

    @property
    def display(self) -> str:
        """The shortest form, as tags/ps show it: the tag is always present."""
        if self.host.lower() != DEFAULT_HOST:
            prefix = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != DEFAULT_NAMESPACE:
            prefix = f"{self.namespace}/"
        else:
            prefix = ""
        return f"{prefix}{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """Fully qualified, as Ollama writes it in capability errors."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity used for every lookup."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())

    @property
    def is_default_namespace(self) -> bool:
        return self.host.lower() == DEFAULT_HOST and self.namespace.lower() == DEFAULT_NAMESPACE

    def path_parts(self) -> tuple[str, str, str, str]:
        """Directory parts of the manifest path: host/namespace/model/tag, lower-cased so
        that one model never has two directories differing only in case."""
        return self.key

    def with_tag(self, tag: str) -> "ModelName":
        return ModelName(self.host, self.namespace, self.model, tag, self.scheme)

    def __str__(self) -> str:
        return self.display
