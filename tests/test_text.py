import pytest

from daemon.engine.text import IncrementalDetokenizer, StopMatcher
from tinymodels import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_detokenizer_holds_back_half_characters(tok):
    ids = tok.encode("café ☃ naïve", add_special_tokens=False)
    byte_ids = tok.encode("é", add_special_tokens=False)
    assert len(byte_ids) == 2  # é is two byte tokens in this vocabulary
    d = IncrementalDetokenizer(tok, tok.encode("hello", add_special_tokens=False))
    out = [d.push(t) for t in ids]
    assert "".join(out) + d.flush() == "café ☃ naïve"
    assert all("\ufffd" not in piece for piece in out)


def test_detokenizer_keeps_leading_spaces(tok):
    prompt = tok.encode("Hello", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, prompt)
    assert "".join(d.push(t) for t in tok.encode(" world", add_special_tokens=False)) == " world"


def test_flush_releases_an_incomplete_tail(tok):
    d = IncrementalDetokenizer(tok, [])
    first_byte = tok.encode("é", add_special_tokens=False)[0]
    assert d.push(first_byte) == ""
    assert d.flush() == "\ufffd"


@pytest.mark.parametrize("stops,pieces,expected,stopped", [
    (["STOP"], ["Hel", "lo S", "T", "OP more"], ["Hel", "lo ", "", ""], True),
    (["STOP"], ["ST", "X"], ["", "STX"], False),
    (["\n\n", "END"], ["a\n", "\nb"], ["a", ""], True),
    (["ab"], ["xab"], ["x"], True),
    (["abc", "b"], ["ab"], ["a"], True),  # the earliest match wins
    ([], ["anything"], ["anything"], False),
])
def test_stop_matcher(stops, pieces, expected, stopped):
    m = StopMatcher(stops)
    results = [m.push(p) for p in pieces]
    assert [r[0] for r in results] == expected
    assert results[-1][1] is stopped


def test_stop_matcher_flush():
    m = StopMatcher(["STOP"])
    assert m.push("abc ST") == ("abc ", False)
    assert m.flush() == "ST"
