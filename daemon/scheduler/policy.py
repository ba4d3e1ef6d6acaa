"""Placement policy, kept apart from the queueing: how much memory there is, and which idle
models to unload so that a new one fits.

The budget is `--gpu-memory` / HFOLLAMA_GPU_MEMORY (bytes with an optional unit, or a
fraction of the device), else the GPU's free memory at start minus a reserve, or on a
machine without a GPU the host's available memory minus a reserve. Victims are idle models
only (a model in use is never unloaded: the load waits for it), shortest keep_alive first,
then least recently used, as Ollama orders them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, Sequence

GIB = 1 << 30
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 10**6, "mb": 10**6, "mib": 1 << 20,
          "g": 10**9, "gb": 10**9, "gib": 1 << 30, "t": 10**12, "tb": 10**12, "tib": 1 << 40}


def parse_memory(text: str, total: int) -> int:
    """"24GiB", "20000000000", "8 GB", or a fraction of the device like "0.9"."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"invalid memory size {text!r}: use bytes with a unit (24GiB, 8GB) or a fraction (0.9)")
    value, unit = float(m.group(1)), m.group(2).lower()
    if not unit and value <= 1.0:
        return int(value * total)
    return int(value * _UNITS[unit])


def human_bytes(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / (1 << 20):.0f} MiB"


def host_memory() -> tuple[int, int]:
    """(total, available) bytes of host memory, from /proc/meminfo."""
    fields = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"], fields.get("MemAvailable", fields["MemFree"])


@dataclass(frozen=True)
class MemoryBudget:
    capacity: int
    device: str  # "cuda:0" / "cpu"
    source: str  # how the capacity was chosen, for the log

    @classmethod
    def detect(cls, device_type: str, setting: str = "", device_index: int = 0) -> "MemoryBudget":
        if device_type == "cuda":
            import torch

            free, total = torch.cuda.mem_get_info(device_index)
            if setting:
                return cls(parse_memory(setting, total), f"cuda:{device_index}", f"--gpu-memory {setting}")
            reserve = max(512 << 20, total // 32)
            return cls(max(0, free - reserve), f"cuda:{device_index}",
                       f"free GPU memory {human_bytes(free)} minus a {human_bytes(reserve)} reserve")
        total, available = host_memory()
        if setting:
            return cls(parse_memory(setting, total), "cpu", f"--gpu-memory {setting} (host memory)")
        reserve = max(1 << 30, total // 10)
        return cls(max(0, available - reserve), "cpu",
                   f"available memory {human_bytes(available)} minus a {human_bytes(reserve)} reserve")


class Candidate(Protocol):
    refcount: int
    keep_alive_ns: int
    last_used: float

    @property
    def size_bytes(self) -> int: ...


def choose_victims(residents: Sequence[Candidate], need: int, capacity: int, max_loaded: int) -> list | None:
    """The idle residents to unload so that `need` more bytes fit and the count stays under
    max_loaded; [] when nothing must go; None when freeing every idle one would not do
    (the caller then waits for a busy one)."""
    used = sum(r.size_bytes for r in residents)
    if used + need <= capacity and len(residents) < max_loaded:
        return []
    idle = sorted((r for r in residents if r.refcount == 0), key=lambda r: (r.keep_alive_ns, r.last_used))
    victims: list = []
    for r in idle:
        victims.append(r)
        used -= r.size_bytes
        if used + need <= capacity and len(residents) - len(victims) < max_loaded:
            return victims
    return None
