"""Settings, read once from Ollama's environment variables and the flags of `serve`.

Precedence: flags > environment > defaults. Values are trimmed of spaces and quotes, as
Ollama's envconfig does. Nothing else in the daemon reads the environment.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

from daemon.durations import parse_keep_alive_env

DEFAULT_PORT = 11434
DEFAULT_KEEP_ALIVE_NS = 5 * 60 * 1_000_000_000
TRACE = 5  # below logging.DEBUG, for OLLAMA_DEBUG=2


def env_var(env: Mapping[str, str], key: str) -> str:
    return env.get(key, "").strip().strip("\"'")


@dataclass(frozen=True)
class BindAddress:
    scheme: str
    host: str
    port: int
    path: str = ""

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_host(text: str) -> BindAddress:
    """OLLAMA_HOST in every form Ollama accepts: host, host:port, :port,
    scheme://host[:port][/path], [v6]:port. No port: 11434, or 80/443 for http:// and https://."""
    s = text.strip().strip("\"'")
    default_port = DEFAULT_PORT
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    hostport, _, path = hostport.partition("/")

    host, port_text = _split_host_port(hostport)
    if host is None:
        host, port_text = "127.0.0.1", str(default_port)
        bare = hostport.strip("[]")
        try:
            host = str(ipaddress.ip_address(bare))
        except ValueError:
            if hostport:
                host = hostport
    try:
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        logging.getLogger(__name__).warning("invalid port %r, using default %d", port_text, default_port)
        port = default_port
    if host == "":
        host = "0.0.0.0"  # ":port" listens on every interface, as Go's net.Listen does
    return BindAddress(scheme=scheme, host=host, port=port, path=path)


def _split_host_port(hostport: str) -> tuple[str | None, str]:
    """Go's net.SplitHostPort: None when there is no port (or the form is invalid)."""
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 >= len(hostport) or hostport[end + 1] != ":":
            return None, ""
        return hostport[1:end], hostport[end + 2:]
    if hostport.count(":") != 1:
        return None, ""
    host, _, port = hostport.partition(":")
    return host, port


def _home(env: Mapping[str, str]) -> Path:
    return Path(env.get("HOME") or Path.home())


def default_models_dir(env: Mapping[str, str]) -> Path:
    return _home(env) / ".hfollama" / "models"


def log_level(text: str) -> int:
    """OLLAMA_DEBUG: a boolean, or 1 (debug) / 2 (trace)."""
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return logging.DEBUG
    if lowered in ("", "0", "f", "false"):
        return logging.INFO
    try:
        n = int(text)
    except ValueError:
        return logging.INFO
    return TRACE if n >= 2 else logging.DEBUG


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    text = env_var(env, key)
    if not text:
        return default
    try:
        return int(text)
    except ValueError:
        logging.getLogger(__name__).warning("invalid %s=%r, using %d", key, text, default)
        return default


def _choice(env: Mapping[str, str], key: str, allowed: tuple[str, ...], default: str) -> str:
    text = env_var(env, key).strip().lower()
    if text and text not in allowed:
        logging.getLogger(__name__).warning("invalid %s=%r (one of %s), using %s", key, text, "/".join(allowed), default)
        return default
    return text or default


def parse_api_keys(text: str) -> tuple[str, ...]:
    """HFOLLAMA_API_KEYS: keys separated by commas or whitespace."""
    return tuple(k for k in text.replace(",", " ").split() if k)


def read_api_key_file(path: Path) -> tuple[str, ...]:
    """A file of API keys, one per line (blank lines and # comments skipped). Unreadable or
    empty is an error: a daemon meant to be keyed must not start open."""
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    keys = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
    if not keys:
        raise ValueError(f"the API key file {path} holds no keys")
    return keys


@dataclass(frozen=True)
class Settings:
    bind: BindAddress = field(default_factory=lambda: parse_host(""))
    models_dir: Path = field(default_factory=lambda: default_models_dir(os.environ))
    user_modelfiles_dir: Path = field(default_factory=lambda: _home(os.environ) / ".hfollama" / "modelfiles")
    keep_alive_ns: int = DEFAULT_KEEP_ALIVE_NS
    origins: tuple[str, ...] = ()
    context_length: int = 0  # 0: choose by device memory, as Ollama does
    log_level: int = logging.INFO
    num_parallel: int = 0  # 0: choose by device
    max_queue: int = 512
    max_loaded_models: int = 0  # 0: 3 per GPU, 3 on CPU
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gpu_memory: str = ""  # the memory budget: bytes with a unit, or a fraction of the device
    # on | off: a bf16 copy of 4-bit weights for long prompt passes (batches multiply the 4-bit
    # weights themselves: engine/cuda/batched.py)
    batch_weights: str = "off"
    prefix_cache: bool = True  # a new prompt reuses the KV of the longest cached prefix (HFOLLAMA_PREFIX_CACHE)
    # API keys (HFOLLAMA_API_KEYS, HFOLLAMA_API_KEYS_FILE): none leaves every route open, as Ollama
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    metrics_auth: bool = True  # /metrics needs a key too, when there are keys (HFOLLAMA_METRICS_AUTH)
    log_format: str = "text"  # text | json (HFOLLAMA_LOG_FORMAT)
    hf_token: str | None = field(default=None, repr=False)
    hf_endpoint: str | None = None  # HF_ENDPOINT: a Hub mirror (the tests use a local one)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Settings":
        env = os.environ if env is None else env
        models = env_var(env, "OLLAMA_MODELS")
        modelfiles = env_var(env, "HFOLLAMA_MODELFILES")
        models_dir = Path(models).expanduser() if models else default_models_dir(env)
        keys = parse_api_keys(env_var(env, "HFOLLAMA_API_KEYS"))
        if env_var(env, "HFOLLAMA_API_KEYS_FILE"):
            keys += read_api_key_file(Path(env_var(env, "HFOLLAMA_API_KEYS_FILE")))
        settings = cls(
            bind=parse_host(env_var(env, "OLLAMA_HOST")),
            models_dir=models_dir,
            user_modelfiles_dir=Path(modelfiles).expanduser() if modelfiles else _home(env) / ".hfollama" / "modelfiles",
            keep_alive_ns=parse_keep_alive_env(env_var(env, "OLLAMA_KEEP_ALIVE"), DEFAULT_KEEP_ALIVE_NS),
            origins=tuple(o.strip() for o in env_var(env, "OLLAMA_ORIGINS").split(",") if o.strip()),
            context_length=max(0, _int(env, "OLLAMA_CONTEXT_LENGTH", 0)),
            log_level=log_level(env_var(env, "OLLAMA_DEBUG")),
            num_parallel=max(0, _int(env, "OLLAMA_NUM_PARALLEL", 0)),
            max_queue=max(1, _int(env, "OLLAMA_MAX_QUEUE", 512)),
            max_loaded_models=max(0, _int(env, "OLLAMA_MAX_LOADED_MODELS", 0)),
            device=env_var(env, "HFOLLAMA_DEVICE") or "auto",
            gpu_memory=env_var(env, "HFOLLAMA_GPU_MEMORY"),
            batch_weights=_choice(env, "HFOLLAMA_BATCH_WEIGHTS", ("on", "off"), "off"),
            prefix_cache=_choice(env, "HFOLLAMA_PREFIX_CACHE", ("on", "off"), "on") == "on",
            api_keys=keys,
            metrics_auth=_choice(env, "HFOLLAMA_METRICS_AUTH", ("on", "off"), "on") == "on",
            log_format=_choice(env, "HFOLLAMA_LOG_FORMAT", ("text", "json"), "text"),
            hf_token=env_var(env, "HF_TOKEN") or None,
            hf_endpoint=env_var(env, "HF_ENDPOINT") or None,
        )
        return settings.with_overrides(**overrides)

    def with_overrides(self, **overrides: object) -> "Settings":
        """Apply flags; None means "not given"."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return replace(self, **given) if given else self

    @property
    def modelfiles_dir(self) -> Path:
        """The user's modelfiles (HFOLLAMA_MODELFILES): they override and extend the shipped ones."""
        return self.user_modelfiles_dir
