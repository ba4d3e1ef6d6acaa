import pytest

from daemon.durations import FOREVER_NS, format_duration, parse_go_duration, parse_keep_alive, parse_keep_alive_env
from daemon.errors import BadRequest

S = 1_000_000_000


@pytest.mark.parametrize("text,ns", [
    ("0", 0), ("-0", 0), ("10m", 600 * S), ("1h30m", 5400 * S), ("300ms", 300_000_000), ("1.5h", 5400 * S),
    (".5s", S // 2), ("1us", 1000), ("1µs", 1000), ("2ns", 2), ("-1m", -60 * S), ("+5s", 5 * S),
])
def test_go_durations(text, ns):
    assert parse_go_duration(text) == ns


@pytest.mark.parametrize("text,message", [
    ("-1", 'time: missing unit in duration "-1"'),
    ("3600", 'time: missing unit in duration "3600"'),
    ("", 'time: invalid duration ""'),
    ("5x", 'time: unknown unit "x" in duration "5x"'),
    ("m", 'time: invalid duration "m"'),
])
def test_go_duration_errors(text, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_go_duration(text)


@pytest.mark.parametrize("value,ns", [
    (None, None), (0, 0), (30, 30 * S), (1.5, int(1.5 * S)), (-1, FOREVER_NS), ("5m", 300 * S), ("-1m", FOREVER_NS),
    ("0", 0), (1e30, FOREVER_NS),
])
def test_keep_alive(value, ns):
    assert parse_keep_alive(value) == ns


@pytest.mark.parametrize("value,message", [
    ("-1", 'time: missing unit in duration "-1"'), (True, "Unsupported type: 'bool'"),
    ({}, "Unsupported type: 'map[string]interface {}'"), ([], "Unsupported type: '[]interface {}'"),
])
def test_keep_alive_errors(value, message):
    with pytest.raises(BadRequest) as err:
        parse_keep_alive(value)
    assert err.value.message == message


@pytest.mark.parametrize("text,ns", [("", 7), ("10m", 600 * S), ("3600", 3600 * S), ("-1", FOREVER_NS),
                                     ("junk", 7), ("0", 0)])
def test_keep_alive_env(text, ns):
    assert parse_keep_alive_env(text, 7) == ns


def test_format_duration():
    assert format_duration(FOREVER_NS) == "forever"
    assert format_duration(90 * S) == "1m30s"
    assert format_duration(5 * S) == "5s"
