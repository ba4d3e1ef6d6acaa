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
