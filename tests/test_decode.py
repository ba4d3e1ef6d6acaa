import pytest

from daemon.api.decode import ArrayOf, Struct, decode_body
from daemon.errors import BadRequest

SPEC = Struct("Req", {"model": "string", "n": "int", "f": "float32", "ok": "bool", "ids": "[]int",
                      "words": "[]string", "opts": "map[string]interface {}", "any": "interface {}",
                      "items": ArrayOf(Struct("Item", {"name": "string"}))})


@pytest.mark.parametrize("raw,message", [
    (b"", "missing request body"),
    (b" \n ", "missing request body"),
    (b"{", "unexpected EOF"),
    (b'{"model": "x"', "unexpected EOF"),
    (b'{"model": "x}', "unexpected EOF"),
    (b"x", "invalid character 'x' looking for beginning of value"),
    (b"NaN", "invalid character 'N' looking for beginning of value"),
    (b'{"model":"x",}', "invalid character '}' looking for beginning of object key string"),
    (b'{"model" "x"}', "invalid character '\"' after object key"),
    (b'{"model":"x" "n":1}', "invalid character '\"' after object key:value pair"),
    (b'{"ids":[1 2]}', "invalid character '2' after array element"),
    (b'{"model":"x"} {}', "invalid character '{' after top-level value"),
    (b"[]", "json: cannot unmarshal array into Go value of type api.Req"),
    (b'"s"', "json: cannot unmarshal string into Go value of type api.Req"),
    (b'{"model":1}', "json: cannot unmarshal number into Go struct field Req.model of type string"),
    (b'{"n":"1"}', "json: cannot unmarshal string into Go struct field Req.n of type int"),
    (b'{"n":1.5}', "json: cannot unmarshal number 1.5 into Go struct field Req.n of type int"),
    (b'{"n":true}', "json: cannot unmarshal bool into Go struct field Req.n of type int"),
    (b'{"f":"x"}', "json: cannot unmarshal string into Go struct field Req.f of type float32"),
    (b'{"ok":1}', "json: cannot unmarshal number into Go struct field Req.ok of type bool"),
    (b'{"ids":[1,"a"]}', "json: cannot unmarshal string into Go struct field Req.ids of type int"),
    (b'{"words":"a"}', "json: cannot unmarshal string into Go struct field Req.words of type []string"),
    (b'{"opts":[]}', "json: cannot unmarshal array into Go struct field Req.opts of type map[string]interface {}"),
    (b'{"items":{}}', "json: cannot unmarshal object into Go struct field Req.items of type []api.Item"),
    (b'{"items":[{"name":2}]}', "json: cannot unmarshal number into Go struct field Req.items.name of type string"),
])
def test_errors_use_go_wording(raw, message):
    with pytest.raises(BadRequest) as err:
        decode_body(raw, SPEC)
    assert err.value.message == message


def test_known_fields_kept_unknown_dropped_nulls_absent():
    d = decode_body(b'{"model":"m","n":3,"f":1,"extra":1,"ok":null,"any":[1],"items":[{"name":"a","x":1}]}', SPEC)
    assert d == {"model": "m", "n": 3, "f": 1, "ok": None, "any": [1], "items": [{"name": "a"}]}


@pytest.mark.parametrize("raw,message", [
    (b'{"n": 9223372036854775808}', "json: cannot unmarshal number 9223372036854775808 into Go struct field Req.n of type int"),
    (b'{"ids": [1, -9223372036854775809]}',
     "json: cannot unmarshal number -9223372036854775809 into Go struct field Req.ids of type int"),
    (b'{"any": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "exceeded max depth"),
    (b'{"opts": ' + b'{"a":' * 50_000 + b"1" + b"}" * 50_000 + b"}", "exceeded max depth"),
])
def test_numbers_go_cannot_hold_and_deep_nesting_are_bad_requests(raw, message):
    with pytest.raises(BadRequest) as err:
        decode_body(raw, SPEC)
    assert err.value.message == message


def test_an_array_past_its_bound_is_refused_before_its_items_are_checked():
    import json
    import time

    spec = Struct("Req", {"items": ArrayOf(Struct("Item", {"name": "string"}), 1000, "items")})
    assert len(decode_body(json.dumps({"items": [{"name": "x"}] * 1000}).encode(), spec)["items"]) == 1000
    raw = json.dumps({"items": [{"name": "x"}] * 1_000_000}).encode()
    started = time.perf_counter()
    with pytest.raises(BadRequest, match=r"too many items: 1000000 \(at most 1000 are accepted\)"):
        decode_body(raw, spec)
    assert time.perf_counter() - started < 3  # json.loads of 17 MB; the million items are never checked
