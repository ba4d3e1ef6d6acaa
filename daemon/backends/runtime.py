"""A loaded model ready to serve: weights, KV slots, the runner thread, the prompt builder.

This is the one place that knows how a ResolvedModel becomes a runner; the scheduler only
sees `load_runtime` and `ModelRuntime.close`.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch

from daemon.backends.transformers_backend import LoadedModel, load_causal_lm, pick_device
from daemon.config import Settings
from daemon.engine.forward import LlamaForward
from daemon.engine.prompt import PromptBuilder
from daemon.engine.runner import Runner
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


@dataclass
class ModelRuntime:
    resolved: ResolvedModel
    loaded: LoadedModel
    forward: LlamaForward
    runner: Runner
    prompts: PromptBuilder
    num_ctx: int
    default_num_ctx: int
    load_seconds: float

    @property
    def size_bytes(self) -> int:
        """Weights plus the KV cache of every slot (what the runner holds)."""
        return self.forward.weights_bytes + self.forward.kv_bytes_per_token * self.num_ctx * self.forward.num_slots

    @property
    def size_vram(self) -> int:
        return self.size_bytes if self.loaded.device.type == "cuda" else 0

    def close(self) -> None:
        self.runner.close()
        device = self.loaded.device
        # Drop every reference to the tensors before asking the allocator to let go.
        self.forward.k_cache.clear()
        self.forward.v_cache.clear()
        del self.forward, self.loaded, self.runner, self.prompts
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def load_runtime(resolved: ResolvedModel, settings: Settings, num_ctx: int | None = None,
                 num_parallel: int | None = None) -> ModelRuntime:
    """Load weights and start the runner. Runs off the event loop (it takes seconds)."""
    started = time.perf_counter()
    device = pick_device(settings.device)
    loaded = load_causal_lm(resolved, device, DerivedCache(settings.models_dir / "derived"))
    default_ctx = default_num_ctx(settings, device, resolved.context_length)
    ctx = min(num_ctx, resolved.context_length or num_ctx) if num_ctx else default_ctx
    slots = num_parallel or default_num_parallel(settings, device)
    forward = LlamaForward(loaded.model, num_slots=slots, max_ctx=ctx)
    runner = Runner(forward, loaded.tokenizer, loaded.eos_token_ids, name=resolved.name.display)
    modelfile = resolved.modelfile
    prompts = PromptBuilder(loaded.tokenizer, resolved.template, system=modelfile.system,
                            messages=modelfile.messages, fim=modelfile.fim)
    seconds = time.perf_counter() - started
    log.info("loaded %s on %s in %.1fs (num_ctx %d, %d slots)", resolved.name.display, device, seconds, ctx, slots)
    return ModelRuntime(resolved, loaded, forward, runner, prompts, ctx, default_ctx, seconds)
