"""From messages (or a generate prompt) to token ids, as Ollama builds prompts.

Chat: the model's MESSAGE history is prepended, its SYSTEM added when the conversation has
none, the template rendered (a Jinja chat template through the tokenizer, or an Ollama Go
template), then tokenized. When the prompt does not fit num_ctx, the oldest turns are
dropped (system messages and the last message always stay), and if the last message alone
is still too long its tokens are cut, keeping the first num_keep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from daemon.errors import BadRequest
from daemon.registry import gotemplate
from daemon.registry.modelfile import Fim


@dataclass(frozen=True)
class ContextBudget:
    num_ctx: int
    num_keep: int = 4
    num_predict: int = -1
    truncate: bool = True

    @property
    def limit(self) -> int:
        """Most prompt tokens that still leave room for one generated token."""
        return self.num_ctx - 1

    @property
    def truncated_limit(self) -> int:
        """When a prompt must be cut anyway, leave room to answer: num_predict tokens when
        it is set and modest, else a quarter of the context."""
        reserve = self.num_predict if 0 < self.num_predict < self.num_ctx // 2 else self.num_ctx // 4
        return max(1, self.num_ctx - max(1, reserve))


class PromptBuilder:
    def __init__(self, tokenizer: Any, template: str, system: str = "",
                 messages: Sequence[dict[str, str]] = (), fim: Fim | None = None) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.system = system
        self.history = [dict(m) for m in messages]
        self.fim = fim

    # ---- rendering ----------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], *, template: str | None = None, tools: list | None = None,
               think: bool | None = None, think_level: str | None = None) -> str:
        source = template or self.template
        try:
            if gotemplate.is_go_template(source):
                return gotemplate.render_messages(source, messages, tools=tools, think=bool(think),
                                                  think_level=think_level or "", is_think_set=think is not None)
            extra: dict[str, Any] = {}
            if think is not None:
                extra["enable_thinking"] = think
                if think_level:
                    extra["reasoning_effort"] = think_level
            return self.tokenizer.apply_chat_template(messages, tools=tools or None, chat_template=source,
                                                      add_generation_prompt=True, tokenize=False, **extra)
        except gotemplate.TemplateError as exc:
            raise BadRequest(str(exc)) from None
        except Exception as exc:  # jinja2 errors, raise_exception() in templates
            if type(exc).__module__.startswith("jinja2"):
                raise BadRequest(f"template error: {exc}") from None
            raise

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        bos = self.tokenizer.bos_token_id
        if add_special_tokens and bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the text carried its own BOS
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    # ---- prompts ------------------------------------------------------------------------

    def conversation(self, messages: list[dict[str, Any]], include_history: bool = True) -> list[dict[str, Any]]:
        msgs = (self.history if include_history else []) + messages
        if self.system and (not messages or messages[0].get("role") != "system"):
            msgs = [{"role": "system", "content": self.system}] + msgs
        return msgs

    def chat_ids(self, messages: list[dict[str, Any]], budget: ContextBudget, *, tools: list | None = None,
                 think: bool | None = None, think_level: str | None = None,
                 template: str | None = None) -> list[int]:
        def ids_for(msgs: list[dict[str, Any]]) -> list[int]:
            return self.tokenize(self.render(msgs, template=template, tools=tools, think=think,
                                             think_level=think_level))

        ids = ids_for(messages)
        if len(ids) <= budget.limit:
            return ids
        if not budget.truncate:
            raise BadRequest(f"the input length ({len(ids)} tokens) exceeds the context length "
                             f"({budget.num_ctx} tokens)")
        start = len(messages) - 1
        for i in range(len(messages) - 2, -1, -1):
            candidate = [m for m in messages[:i] if m.get("role") == "system"] + messages[i:]
            if len(ids_for(candidate)) > budget.truncated_limit:
                break
            start = i
        kept = [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]
        return fit_tokens(ids_for(kept), budget)

    def generate_messages(self, prompt: str, system: str = "", include_history: bool = True) -> list[dict[str, Any]]:
        """/api/generate as a conversation: the request's system (else the model's), the
        model's MESSAGE history unless `context` continues an earlier exchange, the prompt."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.conversation(messages, include_history=include_history)

    def generate_ids(self, prompt: str, budget: ContextBudget, *, system: str = "", template: str | None = None,
                     context: Sequence[int] | None = None, raw: bool = False, suffix: str = "",
                     think: bool | None = None, think_level: str | None = None) -> list[int]:
        """The prompt of an /api/generate request, as Ollama builds it."""
        if raw:
            return fit_tokens(self.tokenize(prompt, add_special_tokens=True), budget)
        if suffix:
            assert self.fim is not None
            fim = f"{self.fim.prefix}{prompt}{self.fim.suffix}{suffix}{self.fim.middle}"
            return fit_tokens(self.tokenize(fim, add_special_tokens=True), budget)
        head = list(context or ())  # the deprecated `context`: earlier ids, continued exactly
        messages = self.generate_messages(prompt, system, include_history=context is None)
        if template:
            return fit_tokens(head + self.tokenize(self.render(messages, template=template)), budget)
        room = ContextBudget(max(2, budget.num_ctx - len(head)), budget.num_keep, budget.num_predict, budget.truncate)
        return fit_tokens(head + self.chat_ids(messages, room, think=think, think_level=think_level), budget)


def fit_tokens(ids: list[int], budget: ContextBudget) -> list[int]:
    """Cut a prompt that is still too long: keep the first num_keep tokens and the tail."""
    if len(ids) <= budget.limit:
        return ids
    if not budget.truncate:
        raise BadRequest(f"the input length ({len(ids)} tokens) exceeds the context length ({budget.num_ctx} tokens)")
    target = budget.truncated_limit
    keep = max(0, min(budget.num_keep, target // 2))
    return ids[:keep] + ids[len(ids) - (target - keep):]


