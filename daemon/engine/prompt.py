"""From messages (or a generate prompt) to token ids, as Ollama builds prompts.

Chat: the model's MESSAGE history is prepended, its SYSTEM added when the conversation has
none, the template rendered (a Jinja chat template through the tokenizer, or an Ollama Go
template), then tokenized. When the prompt does not fit num_ctx, the oldest turns are
dropped (system messages and the last message always stay), and if the last message alone
is still too long its tokens are cut, keeping the first num_keep. However long the input,
the work is bounded by num_ctx, and it stops when the client goes away (`cancel`).
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from typing import Any, Sequence

from daemon.engine.tokencache import PrefixTokenizer
from daemon.engine.vision import ImageTokens, Vision
from daemon.errors import BadRequest
from daemon.registry import gotemplate
from daemon.registry.modelfile import Fim


# Set when the client that asked for a prompt has gone: the work stops at the next render.
Cancel = threading.Event


class PromptCancelled(Exception):
    """The prompt's client went away while it was being built."""


def _check(cancel: Cancel | None) -> None:
    if cancel is not None and cancel.is_set():
        raise PromptCancelled


def _newest(messages: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The messages a prompt of `limit` tokens can hold at most: the newest `limit` ones, and
    the system messages before them (each message renders to at least one token)."""
    if len(messages) <= limit:
        return messages
    cut = len(messages) - limit
    systems = [m for m in messages[:cut] if m.get("role") == "system"][:limit]
    return systems + messages[cut:]


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


# Where a message's images sit while its prompt is built: the message dict's images (ImageTokens),
# which a template never reads (HF templates see image parts, Go templates placeholders).
IMAGES_KEY = "_images"


def with_images(message: dict[str, Any], images: Sequence[ImageTokens]) -> dict[str, Any]:
    return {**message, IMAGES_KEY: list(images)} if images else message


class PromptBuilder:
    def __init__(self, tokenizer: Any, template: str, system: str = "",
                 messages: Sequence[dict[str, str]] = (), fim: Fim | None = None,
                 vision: Vision | None = None) -> None:
        self.tokenizer = tokenizer
        self.vision = vision
        self._tokens = PrefixTokenizer(tokenizer)  # a conversation's next turn: only the new part
        self.template = template
        self.system = system
        self.history = [dict(m) for m in messages]
        self.fim = fim

    def prepare(self) -> None:
        """Pay the first request's one-time costs now (at load, off the event loop, where small
        prompts are built): the vocabulary scan behind the length bound, the template's compile."""
        _ = self._chars_per_token
        try:
            self.render([{"role": "user", "content": "Hello!"}])
        except BadRequest:  # a template that needs more than this: compiled at its first request
            pass

    # ---- rendering ----------------------------------------------------------------------

    def render(self, messages: list[dict[str, Any]], *, template: str | None = None, tools: list | None = None,
               think: bool | None = None, think_level: str | None = None) -> str:
        source = template or self.template
        if any(m.get(IMAGES_KEY) for m in messages):
            messages = [self._image_message(m, gotemplate.is_go_template(source)) for m in messages]
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
        except Exception as exc:  # jinja2's errors, raise_exception(), {% include %} (no loader), ...
            # the template runs on what the client sent (its messages, or its own template)
            raise BadRequest(f"template error: {exc or type(exc).__name__}") from None

    def _image_message(self, message: dict[str, Any], go: bool) -> dict[str, Any]:
        """A message with images as its template takes them: HF chat templates get content parts
        (the images, then the text, as transformers' processors document them), Go templates the
        model's placeholder (in its markers: Vision.inserted) before the text. The placeholders are expanded after rendering."""
        images = message.get(IMAGES_KEY)
        if not images:
            return message
        assert self.vision is not None
        if go:
            return {**message, "content": self.vision.inserted * len(images) + (message.get("content") or "")}
        parts: list[dict[str, Any]] = [{"type": "image"} for _ in images]
        if message.get("content"):
            parts.append({"type": "text", "text": message["content"]})
        return {**message, "content": parts}

    def expand_images(self, text: str, images: Sequence[ImageTokens]) -> str:
        """The rendered prompt with each image placeholder replaced by its image's text (what the
        processor would have made of it)."""
        if self.vision is None or not images:
            return text
        pieces = text.split(self.vision.placeholder)
        if len(pieces) - 1 != len(images):
            raise BadRequest(f"the prompt holds {len(pieces) - 1} image placeholders for {len(images)} images "
                             f"(the model's template places images with {self.vision.placeholder!r})")
        out = [pieces[0]]
        for image, piece in zip(images, pieces[1:]):
            out += [image.text, piece]
        return "".join(out)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if not add_special_tokens:
            return self._tokens.encode(text)
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        bos = self.tokenizer.bos_token_id
        if add_special_tokens and bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]  # the text carried its own BOS
        return ids

    # ---- prompts ------------------------------------------------------------------------

    def conversation(self, messages: list[dict[str, Any]], include_history: bool = True) -> list[dict[str, Any]]:
        msgs = (self.history if include_history else []) + messages
        if self.system and (not messages or messages[0].get("role") != "system"):
            msgs = [{"role": "system", "content": self.system}] + msgs
        return msgs

    def chat_ids(self, messages: list[dict[str, Any]], budget: ContextBudget, *, tools: list | None = None,
                 think: bool | None = None, think_level: str | None = None,
                 template: str | None = None, cancel: Cancel | None = None) -> list[int]:
        """The conversation's prompt within `budget`. A conversation that does not fit loses
        its oldest turns, as in Ollama (system messages and the last message stay). The work is
        bounded by the context, not by the conversation: only the newest `limit` turns are ever
        rendered (each takes at least a token), the cut is found by galloping from the newest
        turn, and a text certainly longer than the context is never tokenized whole."""

        def text_for(msgs: list[dict[str, Any]]) -> str:
            _check(cancel)
            text = self.render(msgs, template=template, tools=tools, think=think, think_level=think_level)
            return self.expand_images(text, [image for m in msgs for image in m.get(IMAGES_KEY) or ()])

        def kept(start: int) -> list[dict[str, Any]]:
            return [m for m in messages[:start] if m.get("role") == "system"] + messages[start:]

        messages = _newest(messages, budget.limit)
        images = [image for m in messages for image in m.get(IMAGES_KEY) or ()]
        ids = self._count(text_for(messages), budget.limit)
        if ids is not None:
            return self._with_virtual_ids(ids, images)
        if not budget.truncate:
            raise BadRequest(f"the input length exceeds the context length ({budget.num_ctx} tokens)")

        def fits(start: int) -> bool:
            return self._count(text_for(kept(start)), budget.truncated_limit) is not None

        last = len(messages) - 1
        good, step = last, 1  # kept(good) is what goes in if nothing earlier fits
        while good - step >= 0 and fits(good - step):
            good, step = good - step, step * 2
        bad = max(-1, good - step)  # kept(bad) does not fit (or there is nothing before 0)
        while good - bad > 1:
            middle = (good + bad) // 2
            if fits(middle):
                good = middle
            else:
                bad = middle
        return self._with_virtual_ids(self.tokenize_fitted(text_for(kept(good)), budget), images)

    def _with_virtual_ids(self, ids: list[int], images: Sequence[ImageTokens]) -> list[int]:
        return ids if self.vision is None or not images else self.vision.substitute(ids, images)

    # ---- bounded tokenizing -------------------------------------------------------------

    @functools.cached_property
    def _chars_per_token(self) -> int:
        """An upper bound on the characters of text one token covers: twice the longest
        vocabulary entry (a byte-level piece covers at most as many characters as it has)."""
        try:
            longest = max((len(piece) for piece in self.tokenizer.get_vocab()), default=0)
        except Exception:  # a tokenizer without a vocabulary listing
            longest = 0
        return 2 * max(longest, 16)

    def _count(self, text: str, limit: int) -> list[int] | None:
        """The text's ids when they are at most `limit`, else None (without tokenizing a text
        that certainly holds more)."""
        if len(text) > (limit + 1) * self._chars_per_token:
            return None
        ids = self.tokenize(text)
        return ids if len(ids) <= limit else None

    def tokenize_fitted(self, text: str, budget: ContextBudget, add_special_tokens: bool = False) -> list[int]:
        """`fit_tokens(tokenize(text))`, tokenizing only the head and tail that a cut keeps
        when the text is certainly longer than the context (a 50 MB prompt costs what a
        context of text costs)."""
        span = self._chars_per_token
        if len(text) <= (budget.limit + 1) * span:
            return fit_tokens(self.tokenize(text, add_special_tokens), budget)
        if not budget.truncate:
            raise BadRequest(f"the input length exceeds the context length ({budget.num_ctx} tokens)")
        target = budget.truncated_limit
        keep = max(0, min(budget.num_keep, target // 2))
        head = self.tokenize(text[:(keep + 1) * span], add_special_tokens)[:keep]
        # at least twice the tokens needed: the tokens near the cut, which the cut may have
        # split differently, are not among those kept
        tail = self.tokenize(text[-(target - keep + 1) * span:])
        return head + tail[len(tail) - (target - keep):]

    def generate_messages(self, prompt: str, system: str = "", include_history: bool = True,
                          images: Sequence[ImageTokens] = ()) -> list[dict[str, Any]]:
        """/api/generate as a conversation: the request's system (else the model's), the
        model's MESSAGE history unless `context` continues an earlier exchange, the prompt."""
        user = with_images({"role": "user", "content": prompt}, images)
        messages = ([{"role": "system", "content": system}] if system else []) + [user]
        return self.conversation(messages, include_history=include_history)

    def generate_ids(self, prompt: str, budget: ContextBudget, *, system: str = "", template: str | None = None,
                     context: Sequence[int] | None = None, raw: bool = False, suffix: str = "",
                     think: bool | None = None, think_level: str | None = None,
                     cancel: Cancel | None = None, images: Sequence[ImageTokens] = ()) -> list[int]:
        """The prompt of an /api/generate request, as Ollama builds it. Raw, its images go
        first unless the prompt places them with the model's placeholders."""
        if raw:
            if images and self.vision is not None and self.vision.placeholder not in prompt:
                prompt = self.vision.inserted * len(images) + prompt
            text = self.expand_images(prompt, images)
            return self._with_virtual_ids(self.tokenize_fitted(text, budget, add_special_tokens=True), images)
        if suffix:
            assert self.fim is not None
            fim = f"{self.fim.prefix}{prompt}{self.fim.suffix}{suffix}{self.fim.middle}"
            return self.tokenize_fitted(fim, budget, add_special_tokens=True)
        head = list(context or ())  # the deprecated `context`: earlier ids, continued exactly
        messages = self.generate_messages(prompt, system, include_history=context is None, images=images)
        room = ContextBudget(max(2, budget.num_ctx - len(head)), budget.num_keep, budget.num_predict, budget.truncate)
        if template:
            text = self.expand_images(self.render(messages, template=template), images)
            return fit_tokens(head + self._with_virtual_ids(self.tokenize_fitted(text, room), images), budget)
        return fit_tokens(head + self.chat_ids(messages, room, think=think, think_level=think_level, cancel=cancel),
                          budget)


def fit_tokens(ids: list[int], budget: ContextBudget) -> list[int]:
    """Cut a prompt that is still too long: keep the first num_keep tokens and the tail."""
    if len(ids) <= budget.limit:
        return ids
    if not budget.truncate:
        raise BadRequest(f"the input length ({len(ids)} tokens) exceeds the context length ({budget.num_ctx} tokens)")
    target = budget.truncated_limit
    keep = max(0, min(budget.num_keep, target // 2))
    return ids[:keep] + ids[len(ids) - (target - keep):]


