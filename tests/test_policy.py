from dataclasses import dataclass

import pytest

from daemon.scheduler.policy import MemoryBudget, choose_victims, parse_memory

GIB = 1 << 30


@pytest.mark.parametrize("text,total,expected", [
    ("24GiB", 0, 24 * GIB), ("8GB", 0, 8 * 10**9), ("0.5", 80 * GIB, 40 * GIB), ("1", 10, 10),
    ("20000000000", 0, 20 * 10**9), ("1.5 gib", 0, int(1.5 * GIB)), ("512MiB", 0, 512 << 20),
])
def test_parse_memory(text, total, expected):
    assert parse_memory(text, total) == expected


@pytest.mark.parametrize("text", ["", "lots", "10XB", "-1GB"])
def test_parse_memory_errors(text):
    with pytest.raises(ValueError, match="invalid memory size"):
        parse_memory(text, 100)


@dataclass
class R:
    name: str
    size_bytes: int
    refcount: int = 0
    keep_alive_ns: int = 300
    last_used: float = 0.0


def test_choose_victims():
    a, b, busy = R("a", 4, last_used=2), R("b", 4, last_used=1), R("busy", 4, refcount=1)
    assert choose_victims([a, b], 2, 10, 3) == []
    assert choose_victims([a, b], 4, 10, 3) == [b]  # least recently used
    assert choose_victims([a, b, busy], 8, 12, 5) == [b, a]
    assert choose_victims([busy], 10, 12, 5) is None  # only a busy one could go: wait
    short = R("short", 4, keep_alive_ns=60, last_used=9)
    assert choose_victims([a, short], 4, 10, 3) == [short]
    assert choose_victims([a, b], 1, 100, 2) == [b]  # the count limit


def test_cpu_budget_comes_from_host_memory():
    budget = MemoryBudget.detect("cpu")
    assert budget.device == "cpu" and budget.capacity > 0 and "available memory" in budget.source
    assert MemoryBudget.detect("cpu", "2GiB").capacity == 2 * GIB
