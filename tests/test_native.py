import pytest

from daemon.api.native import ChatRequest, GenerateRequest, ShowRequest, Think, check_base64_image
from daemon.errors import BadRequest


def test_generate_defaults():
    r = GenerateRequest.from_body(b'{"model":"m"}')
    assert r.stream is True and r.raw is False and r.truncate is True
    assert r.prompt == "" and r.context is None and r.keep_alive_ns is None and r.think is None
    assert r.options == {} and r.top_logprobs == 0


def test_generate_fields():
    r = GenerateRequest.from_body(b'{"model":"m","prompt":"p","stream":false,"context":[1,2],"keep_alive":"1m",'
                                  b'"options":{"temperature":0},"raw":true,"_debug_render_only":true}')
    assert r.stream is False and r.context == (1, 2) and r.keep_alive_ns == 60 * 10**9
    assert r.options == {"temperature": 0} and r.raw and r.debug_render_only


def test_chat_messages_are_normalized():
    r = ChatRequest.from_body(b'{"model":"m","messages":[{"role":"USER"},{"role":"assistant","content":"a",'
                              b'"tool_calls":[{"function":{"name":"f","arguments":{"x":1}}}]},null],"tools":[]}')
    assert [m.role for m in r.messages] == ["user", "assistant"]
    assert r.messages[0].content == "" and r.tools == ()
    assert r.messages[1].to_template_dict()["tool_calls"][0]["function"]["arguments"] == {"x": 1}


@pytest.mark.parametrize("value,expected", [
    (True, Think(True, "medium")), (False, Think(False)), ("high", Think(True, "high")), ("max", Think(True, "max")),
    (None, None),
])
def test_think_values(value, expected):
    assert Think.parse(value) == expected


@pytest.mark.parametrize("value,shown", [("hot", '"hot"'), (1, "1")])
def test_bad_think(value, shown):
    with pytest.raises(BadRequest) as err:
        Think.parse(value)
    assert err.value.message.startswith(f"invalid think value: {shown} (must be")


def test_show_accepts_legacy_name_and_requires_one():
    assert ShowRequest.from_body(b'{"name":"m"}').model == "m"
    with pytest.raises(BadRequest, match="model is required"):
        ShowRequest.from_body(b'{"model":"  "}')


@pytest.mark.parametrize("data,ok", [("aGVsbG8=", True), ("aGVsbG8", False), ("data:image/png;base64,aGk=", False),
                                     ("a b", False)])
def test_images_must_be_plain_base64(data, ok):
    if ok:
        check_base64_image(data)
    else:
        with pytest.raises(BadRequest, match="illegal base64 data at input byte"):
            check_base64_image(data)


def test_top_logprobs_range():
    with pytest.raises(BadRequest, match="top_logprobs must be between 0 and 20"):
        ChatRequest.from_body(b'{"model":"m","top_logprobs":-1}')
