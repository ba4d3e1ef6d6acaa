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


def test_prepare_pays_the_first_requests_costs_and_survives_a_strict_template(tok):
    for template in (CHATML, "{{ raise_exception('roles must alternate') }}"):
        b = PromptBuilder(tok, template)
        b.prepare()
        assert "_chars_per_token" in b.__dict__  # computed, not left to the first request


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


def _ollama_cut(b, msgs, budget):
    """Ollama's own loop (and this module's before it galloped): drop turns from the oldest
    until the rest fits, re-rendering every candidate."""
    def n(ms):
        return len(b.tokenize(b.render(ms)))
    start = len(msgs) - 1
    for i in range(len(msgs) - 2, -1, -1):
        if n([m for m in msgs[:i] if m["role"] == "system"] + msgs[i:]) > budget.truncated_limit:
            break
        start = i
    kept = [m for m in msgs[:start] if m["role"] == "system"] + msgs[start:]
    return fit_tokens(b.tokenize(b.render(kept)), budget)


@pytest.mark.parametrize("turns,num_ctx", [(3, 300), (20, 300), (41, 1000), (60, 97), (7, 40)])
def test_galloping_cut_keeps_what_ollamas_loop_keeps(tok, turns, num_ctx):
    b = PromptBuilder(tok, CHATML)
    msgs = [{"role": "system", "content": "SYS"}]
    for i in range(turns):
        msgs += [{"role": "user", "content": f"q{i} " + "fox " * (i % 7 * 5)},
                 {"role": "assistant", "content": "ok " * (i % 3)}]
    msgs.append({"role": "user", "content": "final"})
    budget = ContextBudget(num_ctx=num_ctx)
    assert b.chat_ids(msgs, budget) == _ollama_cut(b, msgs, budget)


def test_a_huge_conversation_costs_what_its_context_costs(tok):
    """200,000 turns in a context of 512: only the newest ever render, in well under a second."""
    import time

    b = PromptBuilder(tok, CHATML)
    msgs = [{"role": "system", "content": "SYS"}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(200_000)]
    started = time.perf_counter()
    ids = b.chat_ids(msgs, ContextBudget(num_ctx=512))
    assert time.perf_counter() - started < 1.5
    text = tok.decode(ids)
    assert len(ids) <= 512 * 3 // 4 and text.startswith("<|im_start|>system\nSYS") and "message 199999" in text
    with pytest.raises(BadRequest, match="exceeds the context length"):
        b.chat_ids(msgs, ContextBudget(num_ctx=512, truncate=False))


def test_a_huge_prompt_tokenizes_only_what_the_cut_keeps(tok):
    """A 50 MB raw prompt: the head and tail the cut keeps, the same ids as tokenizing it all
    and cutting (checked on a text small enough to tokenize whole), in a fraction of the time."""
    import time

    b = PromptBuilder(tok, CHATML)
    budget = ContextBudget(num_ctx=256, num_keep=5)
    words = " ".join(f"w{i % 997}" for i in range(60_000))  # far beyond the bound, still quick to tokenize
    assert len(words) > (budget.limit + 1) * b._chars_per_token
    assert b.tokenize_fitted(words, budget) == fit_tokens(b.tokenize(words), budget)
    huge = "the quick brown fox " * 2_500_000  # 50 MB
    started = time.perf_counter()
    ids = b.generate_ids(huge, budget, raw=True)
    assert time.perf_counter() - started < 1.0 and len(ids) == budget.truncated_limit
    with pytest.raises(BadRequest, match="exceeds the context length"):
        b.generate_ids(huge, ContextBudget(num_ctx=256, truncate=False), raw=True)


def test_prompt_work_stops_when_the_client_is_gone(tok):
    from daemon.engine.prompt import Cancel, PromptCancelled

    b = PromptBuilder(tok, CHATML)
    cancel = Cancel()
    cancel.set()
    with pytest.raises(PromptCancelled):
        b.chat_ids([{"role": "user", "content": "x"}] * 10, ContextBudget(num_ctx=100), cancel=cancel)


@pytest.mark.parametrize("template", ["{% include 'other.jinja' %}", "{% import 'x' as y %}{{ y }}",
                                      "{{ messages[0]['content'] | nosuchfilter }}", "{{ 1 / 0 }}"])
def test_a_bad_template_is_a_bad_request(tok, template):
    b = PromptBuilder(tok, CHATML)
    with pytest.raises(BadRequest, match="template error"):
        b.render([{"role": "user", "content": "x"}], template=template)
