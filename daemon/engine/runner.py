"""The runner: one decode loop per loaded model, on its own thread.

Requests join through `generate()`, an async generator of `Chunk`s. The loop thread owns
the model and its KV slots; it never waits on an HTTP client: each request has its own
asyncio queue, fed once per step with one `call_soon_threadsafe`. Every iteration runs one
forward: a decode step for all sequences past their prefill, sampled together, which also
takes in the next chunks of waiting prompts (up to `prefill_chunk` tokens in all, so many
short prompts start together and a long one does not stall running streams for long).

A new request takes the KV slot whose cached tokens share the longest prefix with its prompt,
or has that prefix copied into its slot from another one, and prefills only the rest
(engine/prefix.py). A request that is cancelled (client gone) is dropped before the next step
and its slot freed, keeping the tokens it had fed; an error in a prefill pass fails the requests whose prompts were in it (the running
ones decode on); an error in a decode step fails the requests in that step; an error anywhere
else in a step (sampling, detokenizing, a grammar) fails that step's requests. Each failed
request gets the error and its slot back (emptied: nothing half-computed is reused), and the
loop keeps serving the others.

Decoding is pipelined: a step's sampled tokens stay on the device and feed the next step,
which is launched before the host reads them (then detokenizes, matches stops and emits
while the GPU computes). So the GPU does not wait for Python between steps. A step is
chained this way while the batch stays the same and each of its requests can go on without
host-side work per token (no grammar mask, penalty window or logprobs); a sequence that
ends on the token being read has one extra step computed for it, which is discarded.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterable, Protocol, Sequence as Seq

import numpy as np
import torch

from daemon.engine.grammar import Masker
from daemon.engine.params import GenerationRequest, SamplingParams
from daemon.engine.prefix import Holder, Reuse, SlotCache, token_array
from daemon.engine.sampling import SamplingBatch, sample, token_logprobs
from daemon.engine.text import Decoder, IncrementalDetokenizer, StopMatcher
from daemon.errors import DaemonError, InternalError

log = logging.getLogger(__name__)


class ForwardModel(Protocol):
    num_slots: int
    max_ctx: int
    device: torch.device

    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int]) -> torch.Tensor: ...

    def forward_mixed(self, tokens: torch.Tensor, slots: list[int], starts: list[int],
                      chunks: list[tuple[list[int], int, int]]) -> torch.Tensor: ...

    def copy_prefix(self, source: int, targets: list[int], length: int) -> None: ...


@dataclass
class Chunk:
    """A piece of one generation's output. The last one has done=True and the metrics."""

    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    done_reason: str | None = None
    prompt_eval_count: int = 0  # evaluated: the prompt less what the prefix cache held
    prompt_cached_count: int = 0
    prompt_eval_duration_ns: int = 0
    eval_count: int = 0
    eval_duration_ns: int = 0
    output_ids: tuple[int, ...] = ()


class _Sequence:
    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop, tokenizer: Decoder) -> None:
        self.request = request
        self.loop = loop
        self.queue: asyncio.Queue[Chunk | BaseException] = asyncio.Queue()
        self.prompt = list(request.prompt_ids)
        self.generated: list[int] = []
        self.slot: int | None = None
        self.prefilled = 0
        self.reused = 0  # prompt tokens whose keys and values came from the cache
        self.reuse: Reuse | None = None  # a prefix still to copy, or to wait for, before prefilling
        self.cancelled = False
        self.finished = False
        # the prompt's text before the answer (its images' virtual ids are not text)
        context = self.prompt[-16:]
        if request.image_spans and request.image_spans[-1][1] > len(self.prompt) - 16:
            inside = {i for a, b in request.image_spans for i in range(max(a, len(self.prompt) - 16), b)}
            context = [t for i, t in enumerate(self.prompt) if i >= len(self.prompt) - 16 and i not in inside]
        self.detokenizer = IncrementalDetokenizer(tokenizer, context)
        self.stops = StopMatcher(request.stop)
        self.t_prefill_start = 0
        self.t_prefill_end = 0
        self._prompt_array: np.ndarray | None = None

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt) and not self.finished

    def cached_length(self) -> int:
        """How many of prompt + generated have their keys and values in the slot: the prompt
        as far as prefilled, then each generated token but the last (fed to get the next)."""
        if self.prefilled < len(self.prompt):
            return self.prefilled
        return len(self.prompt) + max(0, len(self.generated) - 1)

    def prompt_array(self) -> np.ndarray:
        if self._prompt_array is None:  # converted once: every later admission compares with it
            self._prompt_array = token_array(self.prompt)
        return self._prompt_array

    def holder(self) -> Holder:
        if self.prefilled < len(self.prompt):  # the whole prompt, of which `prefilled` are in
            return Holder(self.slot, self.prompt_array(), self.prefilled, self)
        tokens = np.concatenate([self.prompt_array(), token_array(self.generated[:-1])])
        return Holder(self.slot, tokens, len(tokens), self)

    def chunk_end(self, start: int, end: int) -> int:
        """Where a prefill chunk from `start` that would end at `end` ends: never inside an
        image (before it where the chunk has anything else, else after it)."""
        for a, b in self.request.image_spans:
            if a < end < b:
                end = a if a > start else b
                break
        return min(end, len(self.prompt))

    def position(self) -> int:
        """Cache position of the next token to feed."""
        return len(self.prompt) + len(self.generated) - 1

    def penalty_window(self) -> list[int]:
        n = self.request.sampling.repeat_last_n
        tokens = self.prompt + self.generated
        return tokens if n < 0 else tokens[-n:]


@dataclass
class _InFlight:
    """A decode step launched and sampled on the device, not yet read by the host."""

    seqs: list[_Sequence]
    tokens: torch.Tensor  # [B] on the model's device: the next step's input
    host: torch.Tensor  # [B] the same, copied (asynchronously on a GPU) to host memory
    ready: Any  # a torch.cuda.Event recorded after that copy, or None on the CPU
    batch: SamplingBatch
    steps: torch.Tensor  # [B] tokens generated before this step's token, on the device

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()  # this step's work only: the next one may still be running
        return self.host.tolist()


class Runner:
    def __init__(self, model: ForwardModel, tokenizer: Decoder, eos_token_ids: Iterable[int],
                 prefill_chunk: int = 512, name: str = "model", prefix_cache: bool = True) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.prefill_chunk = max(1, prefill_chunk)
        self.num_slots = model.num_slots
        self.max_ctx = model.max_ctx
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._active: list[_Sequence] = []
        self._free_slots = list(range(model.num_slots))
        self._slots = SlotCache(model.num_slots, enabled=prefix_cache)
        self._outbox: list[tuple[_Sequence, Chunk | BaseException]] = []
        self._tasks: collections.deque[tuple[Any, asyncio.AbstractEventLoop, asyncio.Future]] = collections.deque()
        self._closing = False
        self._masker = Masker()
        self._inflight: _InFlight | None = None
        # the sequences of the phase being run: what an exception anywhere in a step fails
        self._stepping: list[_Sequence] = []
        self._thread = threading.Thread(target=self._loop, name=f"runner:{name}", daemon=True)
        self._thread.start()

    # ---- the asyncio side -------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if not request.prompt_ids:
            raise InternalError("empty prompt")
        if len(request.prompt_ids) >= self.max_ctx:
            raise InternalError(f"prompt of {len(request.prompt_ids)} tokens does not fit the context of {self.max_ctx}")
        seq = _Sequence(request, asyncio.get_running_loop(), self.tokenizer)
        with self._cv:
            if self._closing:
                raise InternalError("the model is unloading")
            self._waiting.append(seq)
            self._cv.notify()
        try:
            while True:
                item = await seq.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.done:
                    return
        finally:
            # The one place where a consumer that stops early (client disconnect, error,
            # aclose) releases its sequence: the loop frees the slot before its next step.
            if not seq.finished:
                with self._cv:
                    seq.cancelled = True
                    self._cv.notify()

    async def run_exclusive(self, fn: Any) -> Any:
        """Run fn() on the loop thread between two steps (nothing else touches the model
        meanwhile) and return its result: embeddings with a generate model use it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cv:
            if self._closing:
                raise InternalError("the model is unloading")
            self._tasks.append((fn, loop, future))
            self._cv.notify()
        return await future

    @property
    def busy(self) -> int:
        with self._cv:
            return len(self._active) + len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences in a slot (prefilling or decoding)."""
        with self._cv:
            return len(self._active)

    @property
    def waiting(self) -> int:
        """Sequences waiting for a slot."""
        with self._cv:
            return len(self._waiting)

    @property
    def prefix_cache(self) -> bool:
        return self._slots.enabled

    @property
    def cached_tokens(self) -> int:
        """Tokens kept in free slots for the next requests (the prefix cache's content)."""
        with self._cv:
            return self._slots.cached_tokens()

    def warm_up(self, prompts: Seq[Seq[int]], new_tokens: int = 3) -> None:
        """Serve these prompts side by side (greedy and sampled in turn) before any request,
        and keep nothing of them in the cache: what runs only on first use is paid here, not
        by the first request after a load (CUDA loads a kernel's module at its first launch:
        sampling's, the prompt pass's logits; 140 ms on an H200, #17). Call it from a thread
        without a running event loop, before the runner takes requests."""

        async def serve(i: int, ids: Seq[int]) -> None:
            sampling = SamplingParams(temperature=0.0) if i % 2 == 0 else SamplingParams(seed=i)
            async for _ in self.generate(GenerationRequest(tuple(ids), sampling, new_tokens)):
                pass

        async def every() -> None:
            await asyncio.gather(*(serve(i, ids) for i, ids in enumerate(prompts)))

        asyncio.run(every())
        with self._cv:
            self._slots = SlotCache(self.num_slots, enabled=self._slots.enabled)

    def close(self) -> None:
        """Stop the loop; pending requests get an error. Returns when the thread is gone."""
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join()

    # ---- the loop thread --------------------------------------------------------------

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            with self._cv:
                while not self._closing and not self._waiting and not self._active and not self._tasks:
                    self._cv.wait()
                if self._closing:
                    for _, loop, future in self._tasks:
                        try:
                            loop.call_soon_threadsafe(_settle, future, None, InternalError("the model was unloaded"))
                        except RuntimeError:
                            pass
                    self._tasks.clear()
                    self._inflight = None
                    pending = list(self._waiting) + self._active
                    self._waiting.clear()
                    self._active.clear()
                    for seq in pending:
                        self._emit(seq, InternalError("the model was unloaded"))
                    self._flush()
                    return
                self._drop_cancelled()
                self._admit()
                tasks, self._tasks = list(self._tasks), collections.deque()
            for fn, loop, future in tasks:
                try:
                    result, error = fn(), None
                except Exception as exc:  # reported to the caller, the loop goes on
                    result, error = None, exc
                try:
                    loop.call_soon_threadsafe(_settle, future, result, error)
                except RuntimeError:
                    pass
            try:
                self._step()
            except Exception as exc:  # fail exactly this step's requests (slots freed), keep serving
                log.exception("runner step failed")
                self._inflight = None
                self._fail([s for s in self._stepping if not s.finished], exc)
            self._stepping = []
            self._flush()

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self._waiting if s.cancelled]:
            self._waiting.remove(seq)
        for seq in [s for s in self._active if s.cancelled]:
            self._release(seq)

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            reuse = self._slots.plan(seq.prompt_array(), self._free_slots, self._busy_holders())
            self._free_slots.remove(reuse.slot)
            self._slots.take(reuse.slot)
            seq.slot = reuse.slot
            if reuse.copies or reuse.leader is not None:
                seq.reuse = reuse  # copied (or waited for) at the next step, outside the lock
            else:
                seq.prefilled = seq.reused = reuse.length
            self._active.append(seq)

    def _busy_holders(self, but: _Sequence | None = None) -> list[Holder]:
        """What running prompts hold or are computing. A prompt waiting for a prefix another
        one computes is left out: it computes nothing of that prefix, and a new prompt sharing
        it follows the one that does (31 followers of one system prompt are not compared with
        each of the others when they arrive together). One whose copy from a free slot is still
        to run stays: it computes the rest."""
        return [s.holder() for s in self._active if s is not but and not s.cancelled and s.slot is not None
                and (s.reuse is None or s.reuse.leader is None)]

    def _take_prefixes(self) -> None:
        """Copy the prefixes planned at admission into their slots; a prompt that waits for a
        prefix another one is computing takes it once that is in (or plans again if the
        other one is gone). Prompts copying the same prefix from the same slot copy together."""
        copies: dict[tuple[int, int], list[_Sequence]] = {}
        for seq in list(self._active):
            reuse = seq.reuse
            if reuse is None or seq.cancelled:
                continue
            if reuse.leader is not None:
                leader = reuse.leader
                if leader in self._active and not leader.cancelled and leader.slot is not None:
                    if leader.cached_length() < reuse.length:
                        continue  # not computed yet: this prompt waits
                    reuse = Reuse(seq.slot, reuse.length, leader.slot)
                else:  # the leader ended or failed: what is there now
                    with self._cv:
                        reuse = self._slots.plan(seq.prompt_array(), [seq.slot], self._busy_holders(but=seq))
                    if reuse.leader is not None:
                        seq.reuse = reuse
                        continue
            seq.reuse = None
            if reuse.copies:
                copies.setdefault((reuse.source, reuse.length), []).append(seq)
        for (source, length), seqs in copies.items():  # one copy per source and length
            try:
                self.model.copy_prefix(source, [seq.slot for seq in seqs], length)
            except Exception as exc:  # these prompts fail; the others go on
                log.exception("copying a cached prefix failed")
                self._fail(seqs, exc)
                continue
            for seq in seqs:
                seq.prefilled = seq.reused = length

    def _release(self, seq: _Sequence, keep: bool = True) -> None:
        """The sequence ends; its slot is free again, holding what the sequence fed through
        it for the next prompts (nothing where it failed: its cache is not to be trusted)."""
        seq.finished = True
        if seq in self._active:
            self._active.remove(seq)
        if seq.slot is not None:
            self._slots.keep(seq.slot, (seq.prompt + seq.generated)[:seq.cached_length()] if keep else ())
            self._free_slots.append(seq.slot)
            seq.slot = None

    def _step(self) -> None:
        self._take_prefixes()
        with self._cv:
            prefilling = [s for s in self._active
                          if s.prefilled < len(s.prompt) and not s.cancelled and s.reuse is None]
        if self._inflight is not None and prefilling:
            self._land()  # the step that takes in new prompts starts from the host's tokens
        with self._cv:
            decoding = [s for s in self._active if s.decoding and s.generated and not s.cancelled]
        if self._inflight is not None and not decoding:
            self._land()
        if prefilling:
            self._prefill(prefilling, decoding)
        elif decoding:
            self._decode(decoding)

    def _prefill(self, seqs: list[_Sequence], decoding: list[_Sequence]) -> None:
        """One forward over the next prompt chunks of waiting sequences, in order, up to
        `prefill_chunk` tokens in all (many short prompts start together, a long one goes on
        in chunks), together with the decode step of the running ones: the weights are read
        once for both, and running streams do not wait for a separate prefill pass."""
        budget, chunks, taken = self.prefill_chunk, [], []
        for seq in seqs:
            if budget <= 0:
                break
            if not seq.t_prefill_start:
                seq.t_prefill_start = time.perf_counter_ns()
            start = seq.prefilled
            chunk = seq.prompt[start:seq.chunk_end(start, start + budget)]
            chunks.append((chunk, seq.slot, start))
            taken.append(seq)
            budget -= len(chunk)
        self._stepping = taken + decoding
        try:
            tokens = torch.tensor([[s.generated[-1]] for s in decoding], dtype=torch.long).view(len(decoding), 1)
            logits = self.model.forward_mixed(tokens, [s.slot for s in decoding], [s.position() for s in decoding],
                                              chunks)
        except Exception as exc:  # the prompts fail; the running streams decode on at the next step
            log.exception("prefill failed")
            self._fail(taken, exc)
            return
        done = []
        for row, (seq, (chunk, _, _)) in enumerate(zip(taken, chunks)):
            seq.prefilled += len(chunk)
            if seq.prefilled == len(seq.prompt):
                seq.t_prefill_end = time.perf_counter_ns()
                done.append(len(decoding) + row)
        rows = list(range(len(decoding))) + done
        if rows:
            self._sample_and_emit(decoding + [taken[row - len(decoding)] for row in done], logits[rows])

    def _decode(self, seqs: list[_Sequence]) -> None:
        inflight = self._inflight
        if inflight is not None and not self._chains(inflight, seqs):
            self._land()  # the batch changed or a request needs the host: read, then decode afresh
            return
        self._stepping = seqs
        try:
            if inflight is not None:  # the tokens still on the device, one position further
                tokens, starts = inflight.tokens[:, None], [s.position() + 1 for s in seqs]
            else:
                tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=self.model.device)
                starts = [s.position() for s in seqs]
            logits = self.model.forward(tokens, [s.slot for s in seqs], starts)
        except Exception as exc:
            log.exception("decode step failed")
            self._land()
            self._fail([s for s in seqs if not s.finished], exc)
            return
        if not all(self._pipelined(s) for s in seqs):
            self._sample_and_emit(seqs, logits)
            return
        launched = self._sample_on_device(seqs, logits, inflight)
        self._land()
        self._inflight = launched

    @staticmethod
    def _pipelined(seq: _Sequence) -> bool:
        """Whether a request's tokens need nothing from the host between steps."""
        request = seq.request
        return request.constraint is None and not request.logprobs and not request.sampling.penalized

    def _chains(self, inflight: _InFlight, seqs: list[_Sequence]) -> bool:
        """The next step can follow the one in flight: the same sequences, none of which ends
        for its length with the token in flight."""
        if inflight.seqs != seqs:
            return False
        for s in seqs:
            after = len(s.generated) + 1  # with the token in flight
            limit = s.request.max_new_tokens
            if (limit is not None and after >= limit) or len(s.prompt) + after >= self.max_ctx:
                return False
        return all(self._pipelined(s) for s in seqs)

    def _sample_on_device(self, seqs: list[_Sequence], logits: torch.Tensor, previous: _InFlight | None) -> _InFlight:
        if previous is not None:
            batch, steps = previous.batch, previous.steps + 1
        else:
            batch = SamplingBatch.from_params([s.request.sampling for s in seqs], logits.device)
            steps = torch.tensor([len(s.generated) for s in seqs], device=logits.device)
        tokens = sample(logits, batch, steps)
        on_gpu = tokens.is_cuda
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=on_gpu)
        host.copy_(tokens, non_blocking=on_gpu)
        ready = None
        if on_gpu:
            ready = torch.cuda.Event()
            ready.record()
        return _InFlight(seqs, tokens, host, ready, batch, steps)

    def _land(self) -> None:
        """Read the step in flight and advance its sequences (those still running)."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return
        self._stepping = inflight.seqs
        for seq, token in zip(inflight.seqs, inflight.read()):
            if not seq.finished and not seq.cancelled:
                self._advance(seq, token, None)

    def _sample_and_emit(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        constraints = [s.request.constraint for s in seqs]
        masks = self._masker.fill(constraints)
        if masks is not None:
            logits = logits.clone()  # the forward's output buffer may be a captured graph's
            self._masker.apply(logits, masks)
        params = [s.request.sampling for s in seqs]
        batch = SamplingBatch.from_params(params, logits.device)
        steps = torch.tensor([len(s.generated) for s in seqs], device=logits.device)
        window = None
        if batch.any_penalty:
            rows = [s.penalty_window() if s.request.sampling.penalized else [] for s in seqs]
            width = max(1, max(len(r) for r in rows))
            window = torch.tensor([r + [-1] * (width - len(r)) for r in rows], device=logits.device)
        next_tokens = sample(logits, batch, steps, window).tolist()
        want_logprobs = [s.request.logprobs for s in seqs]
        lp = None
        if any(want_logprobs):
            top_n = max(s.request.top_logprobs for s in seqs)
            chosen, top_values, top_ids = token_logprobs(logits, torch.tensor(next_tokens, device=logits.device), top_n)
            lp = (chosen.tolist(), top_values.tolist(), top_ids.tolist())
        for row, (seq, token) in enumerate(zip(seqs, next_tokens)):
            logprob = self._logprob_entry(seq, token, row, lp) if want_logprobs[row] else None
            self._advance(seq, token, logprob)

    def _logprob_entry(self, seq: _Sequence, token: int, row: int, lp: tuple) -> dict[str, Any]:
        chosen, top_values, top_ids = lp
        text = self.tokenizer.decode([token], skip_special_tokens=False)
        entry: dict[str, Any] = {"token": text, "logprob": chosen[row], "bytes": list(text.encode("utf-8"))}
        n = seq.request.top_logprobs
        if n > 0:
            entry["top_logprobs"] = [
                {"token": self.tokenizer.decode([tid], skip_special_tokens=False), "logprob": val}
                for tid, val in zip(top_ids[row][:n], top_values[row][:n])
            ]
        return entry

    def _advance(self, seq: _Sequence, token: int, logprob: dict[str, Any] | None) -> None:
        seq.generated.append(token)
        request = seq.request
        reason = None
        if token in self.eos_token_ids:
            reason, text = "stop", self._drain(seq)
        else:
            text, hit = seq.stops.push(seq.detokenizer.push(token))
            if request.constraint is not None:
                request.constraint.accept(token)
            if hit:
                reason = "stop"
            elif request.constraint is not None and request.constraint.finished:
                reason = "stop"  # the value is complete: nothing but EOS could follow
                text += self._drain(seq)
            elif (request.max_new_tokens is not None and len(seq.generated) >= request.max_new_tokens) \
                    or len(seq.prompt) + len(seq.generated) >= self.max_ctx:
                reason = "length"
                text += self._drain(seq)
        # EOS is not output, so it gets no logprob entry (as in OpenAI's and Ollama's APIs)
        logprobs = [logprob] if logprob is not None and token not in self.eos_token_ids else []
        if text or logprobs:
            self._emit(seq, Chunk(text=text, logprobs=logprobs))
        if reason is None:
            return
        self._emit(seq, Chunk(
            done=True,
            done_reason=reason,
            prompt_eval_count=len(seq.prompt) - seq.reused,
            prompt_cached_count=seq.reused,
            prompt_eval_duration_ns=seq.t_prefill_end - seq.t_prefill_start,
            eval_count=len(seq.generated),
            eval_duration_ns=time.perf_counter_ns() - seq.t_prefill_end,
            output_ids=tuple(seq.prompt + seq.generated),
        ))
        with self._cv:
            self._release(seq)

    @staticmethod
    def _drain(seq: _Sequence) -> str:
        """At the end of a stream, what the detokenizer and the stop matcher still hold
        (unless it completes a stop string)."""
        text, hit = seq.stops.push(seq.detokenizer.flush())
        return text if hit else text + seq.stops.flush()

    def _fail(self, seqs: Seq[_Sequence], exc: Exception) -> None:
        error = exc if isinstance(exc, DaemonError) else InternalError(str(exc) or type(exc).__name__)
        with self._cv:
            for seq in seqs:
                self._emit(seq, error)
                self._release(seq, keep=False)

    def _emit(self, seq: _Sequence, item: Chunk | BaseException) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Sequence, Chunk | BaseException]]] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _deliver(items: list[tuple[_Sequence, Chunk | BaseException]]) -> None:
    for seq, item in items:
        seq.queue.put_nowait(item)
