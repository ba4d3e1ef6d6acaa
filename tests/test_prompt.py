import pytest

from daemon.engine.prompt import ContextBudget, PromptBuilder, fit_tokens
from daemon.errors import BadRequest
from daemon.registry.modelfile import Fim
from tinymodels import CHATML, build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_system_and_history_are_prepended(tok):
    b = PromptBuilder(tok, CHATML, system="SYS", messages=[{"role": "user", "content": "before"}])
    conv = b.conversation([{"role": "user", "content": "now"}])
    assert [m["role"] for m in conv] == ["system", "user", "user"]
    # Ollama: the model's MESSAGE history, then the request; its SYSTEM only when the request has none
    assert [m["content"] for m in b.conversation([{"role": "system", "content": "mine"}])] == ["before", "mine"]
    assert len(b.conversation([{"role": "user", "content": "x"}], include_history=False)) == 2


def test_go_and_jinja_templates_render(tok):
    b = PromptBuilder(tok, CHATML)
    msgs = [{"role": "user", "content": "hi"}]
    assert b.render(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert b.render(msgs, template="[{{ .Prompt }}]") == "[hi]"


def test_template_errors_are_bad_requests(tok):
    b = PromptBuilder(tok, "{{ raise_exception('roles must alternate') }}")
    with pytest.raises(BadRequest, match="roles must alternate"):
        b.render([{"role": "user", "content": "x"}])


def test_truncation_keeps_system_and_last_message(tok):
    b = PromptBuilder(tok, CHATML)
    msgs = [{"role": "system", "content": "SYS"}]
    for i in range(20):
        msgs += [{"role": "user", "content": f"question {i} " + "fox " * 30}, {"role": "assistant", "content": "ok"}]
    msgs.append({"role": "user", "content": "final"})
    ids = b.chat_ids(msgs, ContextBudget(num_ctx=300))
    text = tok.decode(ids)
    assert len(ids) <= 300 * 3 // 4 and text.startswith("<|im_start|>system\nSYS")
    assert "final" in text and "question 0 " not in text and "question 19 " in text


def test_fit_tokens_keeps_head_and_tail():
    budget = ContextBudget(num_ctx=20, num_keep=3)
    ids = list(range(100))
    out = fit_tokens(ids, budget)
    assert out[:3] == [0, 1, 2] and out[-1] == 99 and len(out) == budget.truncated_limit
    assert fit_tokens(list(range(10)), budget) == list(range(10))
    with pytest.raises(BadRequest, match="exceeds the context length"):
        fit_tokens(ids, ContextBudget(num_ctx=20, truncate=False))


def test_num_predict_sets_the_room_left_after_truncation():
    assert ContextBudget(num_ctx=1000, num_predict=100).truncated_limit == 900
    assert ContextBudget(num_ctx=1000).truncated_limit == 750


def test_fim(tok):
    b = PromptBuilder(tok, CHATML, fim=Fim("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    ids = b.generate_ids("def f(", ContextBudget(num_ctx=100), suffix="):")
    assert tok.decode(ids) == "<|im_start|>def f(<|im_end|>):<|endoftext|>"
