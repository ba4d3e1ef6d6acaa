"""The /v1 translations (daemon/api/openai.py): OpenAI bodies -> native requests, native
lines -> OpenAI objects. Pure functions, no daemon."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from daemon.api.openai import (
    ChatChunks, ChatCompletionRequest, CompletionChunks, CompletionRequest, EmbeddingRequest, ReplyIds,
    chat_completion, embedding_list, text_completion,
)
from daemon.api.native import Think
from daemon.errors import BadRequest

USER = [{"role": "user", "content": "hi"}]


def chat_body(**fields) -> bytes:
    return json.dumps({"model": "m", "messages": USER, **fields}).encode()


@pytest.mark.parametrize("fields, expected", [
    ({}, {"temperature": 1.0, "top_p": 1.0}),
    ({"temperature": 0, "top_p": 0.5}, {"temperature": 0, "top_p": 0.5}),
    ({"top_p": 0}, {"temperature": 1.0, "top_p": 1.0}),
    ({"max_tokens": 5}, {"num_predict": 5, "temperature": 1.0, "top_p": 1.0}),
    ({"max_completion_tokens": 7, "max_tokens": 5}, {"num_predict": 7, "temperature": 1.0, "top_p": 1.0}),
    ({"stop": "END"}, {"stop": ["END"], "temperature": 1.0, "top_p": 1.0}),
    ({"stop": ["a", "b"], "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.25},
     {"stop": ["a", "b"], "seed": 3, "frequency_penalty": 0.5, "presence_penalty": 0.25, "temperature": 1.0,
      "top_p": 1.0}),
    ({"options": {"num_ctx": 4096, "temperature": 0.1}, "temperature": 0.7},
     {"num_ctx": 4096, "temperature": 0.7, "top_p": 1.0}),
])
def test_chat_sampling_options(fields, expected):
    assert dict(ChatCompletionRequest.from_body(chat_body(**fields)).native.options) == expected


@pytest.mark.parametrize("response_format, expected", [
    (None, None),
    ({"type": "text"}, None),
    ({"type": "json_object"}, "json"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}, {"type": "object"}),
])
def test_response_format_becomes_format(response_format, expected):
    assert ChatCompletionRequest.from_body(chat_body(response_format=response_format)).native.format == expected


@pytest.mark.parametrize("effort, think", [
    ("none", Think(False)), ("minimal", Think(True, "low")), ("high", Think(True, "high")),
    ("xhigh", Think(True, "max")),
])
def test_reasoning_effort(effort, think):
    assert ChatCompletionRequest.from_body(chat_body(reasoning_effort=effort)).native.think == think
    assert ChatCompletionRequest.from_body(chat_body(reasoning={"effort": effort})).native.think == think


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def test_tool_choice_none_drops_the_tools():
    assert len(ChatCompletionRequest.from_body(chat_body(tools=[TOOL])).native.tools) == 1
    assert ChatCompletionRequest.from_body(chat_body(tools=[TOOL], tool_choice="none")).native.tools == ()
    assert len(ChatCompletionRequest.from_body(chat_body(tools=[TOOL], tool_choice="auto")).native.tools) == 1


def test_messages_parts_tool_calls_and_tool_names():
    png = base64.b64encode(b"\x89PNG").decode()
    messages = [
        {"role": "System", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "look"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}]},
        {"role": "assistant", "content": None, "reasoning": "hmm",
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    native = ChatCompletionRequest.from_body(chat_body(messages=messages)).native.messages
    # a message's image parts stay with its text (its template places them together)
    assert [m.role for m in native] == ["system", "user", "assistant", "tool"]
    assert native[1].content == "look" and native[1].images == (png,)
    assert native[2].tool_calls[0]["function"]["arguments"] == {"a": 1} and native[2].thinking == "hmm"
    assert native[3].tool_name == "f" and native[3].content == "42"


@pytest.mark.parametrize("fields, error", [
    ({"messages": []}, "[] is too short - 'messages'"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "http://x/y.png"}]}]},
     "image URLs are not currently supported, please use base64 encoded data instead"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "nonsense"}]}]},
     "invalid image input"),
    ({"messages": [{"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": "f", "arguments": "{bad"}}]}]},
     "invalid tool call arguments"),
    ({"reasoning_effort": "extreme"}, "invalid reasoning value"),
    ({"stop": 3}, "invalid type for 'stop' field"),
    ({"top_logprobs": 21}, "top_logprobs must be between 0 and 20"),
    ({"max_tokens": "ten"}, "cannot unmarshal string"),
])
def test_chat_request_errors(fields, error):
    with pytest.raises(BadRequest, match=None) as err:
        ChatCompletionRequest.from_body(chat_body(**fields))
    assert error in str(err.value)


def test_completion_request():
    req = CompletionRequest.from_body(json.dumps({
        "model": "m", "prompt": "once", "suffix": "end", "max_tokens": 3, "stop": ["x"], "logprobs": 2,
        "stream": True, "stream_options": {"include_usage": True}, "echo": True, "n": 1}).encode())
    assert req.native.prompt == "once" and req.native.suffix == "end"
    assert req.native.options["num_predict"] == 3 and req.native.options["presence_penalty"] == 0.0
    assert req.native.logprobs and req.native.top_logprobs == 2
    assert req.stream.stream and req.stream.include_usage
    with pytest.raises(BadRequest, match="invalid type for 'stop' field: float64"):
        CompletionRequest.from_body(b'{"model":"m","prompt":"p","stop":["a",1]}')
    with pytest.raises(BadRequest, match="cannot unmarshal array"):
        CompletionRequest.from_body(b'{"model":"m","prompt":["a"]}')


@pytest.mark.parametrize("body, inputs, error", [
    ({"input": "hi"}, ("hi",), None),
    ({"input": ""}, ("",), None),
    ({"input": ["a", "b"]}, ("a", "b"), None),
    ({}, None, "invalid input"),
    ({"input": []}, None, "invalid input"),
    ({"input": [1, 2]}, None, "invalid input"),
    ({"input": "a", "encoding_format": "hex"}, None,
     "Invalid value for 'encoding_format' = hex. Supported values: ['float', 'base64']."),
])
def test_embedding_request(body, inputs, error):
    raw = json.dumps({"model": "m", **body}).encode()
    if error:
        with pytest.raises(BadRequest) as err:
            EmbeddingRequest.from_body(raw)
        assert str(err.value) == error
    else:
        assert EmbeddingRequest.from_body(raw).inputs == inputs


def lines(*texts: str, done_reason: str = "stop") -> list[dict]:
    out = [{"model": "m", "message": {"role": "assistant", "content": t}, "done": False} for t in texts]
    out.append({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
                "done_reason": done_reason, "prompt_eval_count": 4, "eval_count": len(texts)})
    return out


def test_chat_completion_folds_lines():
    ids = ReplyIds("m", "chatcmpl")
    obj = chat_completion(ids, lines("a", "b", done_reason="length"))
    assert obj["object"] == "chat.completion" and obj["id"].startswith("chatcmpl-")
    assert obj["system_fingerprint"] == "fp_ollama"
    assert obj["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "ab"},
                               "finish_reason": "length"}]
    assert obj["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


def test_chat_chunks_sequence():
    chunks = ChatChunks(ReplyIds("m", "chatcmpl"), include_usage=True)
    events = [e for ln in lines("a", "b") for e in chunks.convert(ln)]
    assert [e["choices"][0]["delta"] if e["choices"] else "usage" for e in events] == [
        {"role": "assistant", "content": "a"}, {"content": "b"}, {}, "usage"]
    assert events[2]["choices"][0]["finish_reason"] == "stop"
    assert events[3]["usage"]["total_tokens"] == 6
    assert len({(e["id"], e["created"]) for e in events}) == 1


def test_chat_chunks_tool_calls_are_whole_with_string_arguments():
    chunks = ChatChunks(ReplyIds("m", "chatcmpl"), include_usage=False)
    call = {"id": "call_x", "function": {"name": "f", "arguments": {"a": 1}}}
    stream = [{"message": {"role": "assistant", "content": "", "tool_calls": [call]}, "done": False},
              {"message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"}]
    events = [e for ln in stream for e in chunks.convert(ln)]
    first = events[0]["choices"][0]["delta"]
    assert first["role"] == "assistant"
    assert first["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_text_completion_and_chunks():
    ids = ReplyIds("m", "cmpl")
    gen = [{"response": "a", "done": False}, {"response": "", "done": True, "done_reason": "stop",
                                               "prompt_eval_count": 1, "eval_count": 1}]
    obj = text_completion(ids, gen)
    assert obj["object"] == "text_completion" and obj["choices"][0]["text"] == "a"
    chunks = CompletionChunks(ids, include_usage=True)
    events = [e for ln in gen for e in chunks.convert(ln)]
    assert [e["choices"][0]["finish_reason"] if e["choices"] else "usage" for e in events] == [None, "stop", "usage"]
    assert events[0]["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    assert events[-1]["usage"]["total_tokens"] == 2


def test_embedding_list_float_and_base64():
    vectors = [[0.5, -1.25], [2.0, 0.0]]
    assert embedding_list("m", vectors, 3, False)["data"][1] == {"object": "embedding", "embedding": [2.0, 0.0],
                                                                 "index": 1}
    encoded = embedding_list("m", vectors, 3, True)
    assert struct.unpack("<2f", base64.b64decode(encoded["data"][0]["embedding"])) == (0.5, -1.25)
    assert encoded["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
