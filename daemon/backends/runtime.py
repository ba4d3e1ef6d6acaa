"""A loaded model ready to serve: weights, KV slots, the runner thread, the prompt builder.

This is the one place that knows how a ResolvedModel becomes a runner; the scheduler only
sees `load_runtime` and `ModelRuntime.close`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from daemon.backends.transformers_backend import LoadedModel, load_causal_lm, pick_device
from daemon.config import Settings
from daemon.engine.embed import CONTEXT_EXCEEDED, EmbedResult, EncoderEmbedder, pool, read_pooling
from daemon.engine.forward import ReferenceForward
from daemon.engine.generic import TransformersForward
from daemon.engine.spec import UnsupportedArchitecture
from daemon.engine.grammar import GrammarCompiler
from daemon.engine.images import FEATURES_BUDGET, ImageBytes, check_count
from daemon.engine.prompt import ContextBudget, PromptBuilder
from daemon.engine.runner import Runner
from daemon.engine.vision import ImageTokens, Vision
from daemon.errors import BadRequest, InternalError
from daemon.registry.catalog import ResolvedModel
from daemon.store.derived import DerivedCache

log = logging.getLogger(__name__)

GIB = 1 << 30


def default_num_ctx(settings: Settings, device: torch.device, trained: int) -> int:
    """OLLAMA_CONTEXT_LENGTH, else Ollama's memory tiers, capped at the trained context."""
    if settings.context_length > 0:
        n = settings.context_length
    elif device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        n = 262144 if total >= 47 * GIB else 32768 if total >= 23 * GIB else 4096
    else:
        n = 4096
    return min(n, trained) if trained > 0 else n


def default_num_parallel(settings: Settings, device: torch.device) -> int:
    if settings.num_parallel > 0:
        return settings.num_parallel
    return 4


@dataclass(frozen=True)
class LoadPlan:
    device: torch.device
    num_ctx: int
    default_num_ctx: int
    slots: int
    batch_weights: bool = False  # a bf16 copy of 4-bit matrices for long prompt passes
    prefill_tokens: int = 512  # prompt tokens per prefill pass (several prompts share one)


# A GPU prefills up to this many prompt tokens in one pass: concurrent prompts start together,
# and a long prompt stalls running streams for one pass of this size at a time.
GPU_PREFILL_TOKENS = 2048

VISION_MIN_CTX = 2048


def plan_load(resolved: ResolvedModel, settings: Settings, num_ctx: int | None = None,
              num_parallel: int | None = None) -> LoadPlan:
    """Where and how large a model loads: the one place the scheduler's estimate and the
    loader agree on."""
    from daemon.scheduler.footprint import quantized_mode

    device = pick_device(settings.device)
    default_ctx = default_num_ctx(settings, device, resolved.context_length)
    ctx = min(num_ctx, resolved.context_length or num_ctx) if num_ctx else default_ctx
    if resolved.metadata.vision:  # an image takes hundreds of tokens (Ollama's floor for vision models)
        ctx = max(ctx, min(VISION_MIN_CTX, resolved.context_length or VISION_MIN_CTX))
    slots = num_parallel or default_num_parallel(settings, device)
    prefill = GPU_PREFILL_TOKENS if device.type == "cuda" else 512
    # off by default: batches and short prompt passes multiply the 4-bit weights as they are
    batch_weights = (settings.batch_weights == "on" and device.type == "cuda"
                     and quantized_mode(resolved, "cuda") in ("nf4", "fp4"))
    return LoadPlan(device, ctx, default_ctx, slots, batch_weights, prefill)


def estimate_footprint(resolved: ResolvedModel, settings: Settings, num_ctx: int | None = None) -> int:
    from daemon.scheduler.footprint import estimate

    if resolved.metadata.is_embedding_model:  # weights and activations of one batch
        return int(resolved.size * 1.2) + (64 << 20)
    plan = plan_load(resolved, settings, num_ctx)
    return estimate(resolved, plan.num_ctx, plan.slots, plan.device.type, plan.prefill_tokens,
                    batch_weights=plan.batch_weights).total


@dataclass
class ModelRuntime:
    resolved: ResolvedModel
    loaded: LoadedModel
    forward: Any  # ReferenceForward, FastForward or TransformersForward: the runner's ForwardModel
    runner: Runner
    prompts: PromptBuilder
    num_ctx: int
    default_num_ctx: int
    load_seconds: float
    measured_bytes: int = 0  # GPU memory the load took, measured
    grammars: GrammarCompiler | None = None  # format and tool-call grammars for this tokenizer
    vision: Vision | None = None  # a vision model's processor, tower and image tokens

    @property
    def size_bytes(self) -> int:
        """What it holds: measured on a GPU; on the CPU, weights plus every slot's KV cache; and
        a vision model's encoded images at their budget (they grow after the load)."""
        images = FEATURES_BUDGET if self.vision is not None else 0
        if self.measured_bytes:
            return self.measured_bytes + images
        return (self.forward.weights_bytes + self.forward.kv_bytes_per_token * self.num_ctx * self.forward.num_slots
                + images)

    @property
    def size_vram(self) -> int:
        return self.size_bytes if self.loaded.device.type == "cuda" else 0

    async def image_tokens(self, images: Sequence[str]) -> tuple[list[ImageTokens], list[int]]:
        """The request's images (base64) as prompt tokens, each encoded by the vision tower
        unless its features are held (the same picture as an earlier turn's); their features
        are pinned until `vision.unpin` of the second value. A bad image is the client's 400."""
        vision = self.vision
        if vision is None:
            raise BadRequest(f"{self.resolved.name.full} does not support vision (image input)")
        check_count(len(images))
        prepared: list[tuple[ImageTokens, Any]] = []

        def prepare() -> None:  # decoding and the processor: a worker thread, not the event loop
            for text in images:
                prepared.append(vision.prepare(ImageBytes.from_base64(text)))

        try:
            await asyncio.to_thread(prepare)
            todo = [(tokens, inputs) for tokens, inputs in prepared if inputs is not None]
            if todo:
                await self.runner.run_exclusive(lambda: [vision.encode(tokens, inputs) for tokens, inputs in todo])
        except BaseException:
            vision.unpin([tokens.first for tokens, _ in prepared])
            raise
        return [tokens for tokens, _ in prepared], [tokens.first for tokens, _ in prepared]

    async def embed(self, texts: list[str], truncate: bool) -> EmbedResult:
        """A generate model's embeddings: its final hidden states, mean pooled, computed on
        the runner's thread between decode steps."""
        tokenizer, forward, limit = self.loaded.tokenizer, self.forward, self.num_ctx - 1

        def run() -> EmbedResult:
            vectors, counts = [], []
            for text in texts:
                ids = tokenizer.encode(text, add_special_tokens=True)
                if len(ids) > limit:
                    if not truncate:
                        raise BadRequest(CONTEXT_EXCEEDED)
                    ids = ids[:limit]
                hidden = forward.encode(torch.tensor(ids or [tokenizer.eos_token_id], device=forward.device))
                mask = torch.ones(1, hidden.shape[0], device=hidden.device)
                vectors.append(pool(hidden[None], mask, "mean")[0].cpu().tolist())
                counts.append(len(ids))
            return EmbedResult(vectors, counts)

        return await self.runner.run_exclusive(run)

    def close(self) -> None:
        self.runner.close()
        device = self.loaded.device
        # Drop every reference to the tensors before asking the allocator to let go.
        self.forward.release()
        del self.forward, self.loaded, self.runner, self.prompts
        _free_device_memory(device)


def make_forward(model: torch.nn.Module, slots: int, num_ctx: int, batch_weights: bool = False,
                 prefill_tokens: int = 512):
    """The fastest path that runs the model: hfollama's fast GPU path (CUDA, Triton, a family
    of the model definitions, dense / 4-bit / int8 layers) with its decode graphs captured
    now; else the reference path (the same definitions in PyTorch); else transformers' own
    forward, for any other architecture. The log says which, and why."""
    name = model.config.model_type
    device = next(model.parameters()).device
    if device.type == "cuda":
        from daemon.engine import cuda

        if cuda.available():
            from daemon.engine.cuda.forward import FastForward

            try:
                forward = FastForward(model, num_slots=slots, max_ctx=num_ctx, batch_weights=batch_weights)
            except UnsupportedArchitecture as exc:
                log.info("%s: not on the fast path (%s)", name, exc)
            else:
                forward.capture_all(prefill_tokens)
                log.info("%s: decoding on the fast path", name)
                return forward
    try:
        forward = ReferenceForward(model, num_slots=slots, max_ctx=num_ctx)
    except UnsupportedArchitecture as exc:
        log.info("%s: decoding through transformers' own forward (%s)", name, exc)
        return TransformersForward(model, num_slots=slots, max_ctx=num_ctx)
    log.info("%s: decoding on the reference path", name)
    return forward


# The load's warm-up requests: a short prompt (it rides a captured decode step) and one longer
# than the largest decode bucket (the prompt pass), side by side.
WARM_UP_MESSAGES = ("Hello!", " ".join(["Tell me a story about a cat and a dog."] * 8))


def _warm_up(runner: Runner, prompts: PromptBuilder, num_ctx: int, name: str) -> None:
    """Two requests through the whole path (template, tokenizer, prompt pass, sampling, the
    decode graphs) before the model is handed out; on a GPU only, where first launches load
    kernel modules. An optimization: a template that cannot render them costs nothing but this."""
    budget = ContextBudget(num_ctx)
    try:
        ids = [prompts.chat_ids([{"role": "user", "content": text}], budget) for text in WARM_UP_MESSAGES]
    except Exception as exc:
        log.info("%s: no warm-up request (%s)", name, exc)
        return
    runner.warm_up([i for i in ids if i])


def _free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        if hasattr(torch._C, "_cuda_clearCublasWorkspaces"):  # per-stream workspaces outlive models
            torch._C._cuda_clearCublasWorkspaces()
        torch.cuda.empty_cache()


@dataclass
class EmbeddingRuntime:
    """An encoder model (all-MiniLM and the like): no KV cache, no decode loop."""

    resolved: ResolvedModel
    embedder: EncoderEmbedder
    device: torch.device
    weights_bytes: int
    num_ctx: int
    default_num_ctx: int
    load_seconds: float

    @property
    def size_bytes(self) -> int:
        return self.weights_bytes

    @property
    def size_vram(self) -> int:
        return self.weights_bytes if self.device.type == "cuda" else 0

    # one thread of its own for the encoder, ended at close: each thread that runs torch's
    # parallel ops keeps an OpenMP pool while it lives (scheduler.in_own_thread says why that
    # matters), so the event loop's executor threads are kept clear of them
    _worker: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed"), repr=False)

    async def embed(self, texts: list[str], truncate: bool) -> EmbedResult:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self.embedder.embed, texts, truncate)

    def close(self) -> None:
        self._worker.shutdown(wait=True)
        del self.embedder
        _free_device_memory(self.device)


def load_embedding_runtime(resolved: ResolvedModel, settings: Settings) -> EmbeddingRuntime:
    from transformers import AutoModel, AutoTokenizer

    started = time.perf_counter()
    device = pick_device(settings.device)
    folder = resolved.location.path
    pooling = read_pooling(folder)
    dtype = torch.float32 if device.type == "cpu" else torch.float16
    model = AutoModel.from_pretrained(folder, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    context = min(x for x in (pooling.max_seq_length, resolved.context_length, tokenizer.model_max_length) if x)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return EmbeddingRuntime(resolved, EncoderEmbedder(model, tokenizer, pooling, context), device, weights, context,
                            context, time.perf_counter() - started)


def load_runtime(resolved: ResolvedModel, settings: Settings, num_ctx: int | None = None,
                 num_parallel: int | None = None) -> ModelRuntime | EmbeddingRuntime:
    """Load weights and start the runner. Runs off the event loop (it takes seconds). A
    failure (out of memory included) frees whatever this load allocated before raising."""
    if resolved.metadata.is_embedding_model:
        return load_embedding_runtime(resolved, settings)
    started = time.perf_counter()
    plan = plan_load(resolved, settings, num_ctx, num_parallel)
    device = plan.device
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    loaded = forward = None
    try:
        loaded = load_causal_lm(resolved, device, DerivedCache(settings.models_dir / "derived"))
        forward = make_forward(loaded.model, plan.slots, plan.num_ctx, plan.batch_weights, plan.prefill_tokens)
        runner = Runner(forward, loaded.tokenizer, loaded.eos_token_ids, prefill_chunk=plan.prefill_tokens,
                        name=resolved.name.display, prefix_cache=settings.prefix_cache)
    except BaseException as exc:
        del loaded, forward
        _free_device_memory(device)
        if isinstance(exc, torch.OutOfMemoryError):
            raise InternalError(f"out of memory while loading {resolved.name.display}: {exc}".split("\n")[0]) from None
        raise
    if device.type == "cuda":
        gc.collect()  # the replaced HF modules can sit in reference cycles: count only what stays
        torch.cuda.synchronize(device)
    measured = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else 0
    vision = None
    if loaded.processor is not None:  # images go through the same forward as text
        vision = Vision(loaded.model, loaded.processor, vocab_rows=forward.vocab_size)
        forward.vision = vision
    modelfile = resolved.modelfile
    prompts = PromptBuilder(loaded.tokenizer, resolved.template, system=modelfile.system,
                            messages=modelfile.messages, fim=modelfile.fim, vision=vision)
    prompts.prepare()
    if device.type == "cuda":
        _warm_up(runner, prompts, plan.num_ctx, resolved.name.display)
        if vision is not None:
            vision.warm_up()
    seconds = time.perf_counter() - started
    log.info("loaded %s on %s in %.1fs (num_ctx %d, %d slots%s)", resolved.name.display, device, seconds,
             plan.num_ctx, plan.slots, ", bf16 batch weights" if plan.batch_weights else "")
    grammars = GrammarCompiler(loaded.tokenizer, sorted(loaded.eos_token_ids))
    return ModelRuntime(resolved, loaded, forward, runner, prompts, plan.num_ctx, plan.default_num_ctx, seconds,
                        measured, grammars, vision)
