"""Log lines as text or JSON objects."""

from __future__ import annotations

import json
import logging

from daemon.logs import JsonFormatter, configure_logging


def record(message: str, **extra) -> logging.LogRecord:
    r = logging.LogRecord("daemon.x", logging.WARNING, __file__, 1, message, (), None)
    r.__dict__.update(extra)
    return r


def test_json_lines_carry_the_access_fields():
    line = json.loads(JsonFormatter().format(record("hello %s", access={"status": 200, "model": "m"})))
    assert line["level"] == "warning" and line["logger"] == "daemon.x" and line["status"] == 200
    assert line["time"].endswith("Z") and line["model"] == "m"


def test_json_lines_of_an_exception_stay_one_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        r = logging.LogRecord("daemon.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = JsonFormatter().format(r)
    assert "\n" not in text and "ValueError: boom" in json.loads(text)["exception"]


def test_configure_logging_picks_the_format(capsys):
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(logging.INFO, "json")
        logging.getLogger("daemon.t").info("one")
        configure_logging(logging.INFO, "text")
        logging.getLogger("daemon.t").info("two")
        err = capsys.readouterr().err.splitlines()
        assert json.loads(err[0])["message"] == "one" and err[1].endswith("INFO daemon.t: two")
    finally:
        root.handlers[:], _ = saved
        root.setLevel(saved[1])
