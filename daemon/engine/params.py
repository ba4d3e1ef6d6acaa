"""What one generation asks of the engine, independent of HTTP."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from daemon.api.options import Options

if TYPE_CHECKING:
    from daemon.engine.grammar import Constraint


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    min_p: float = 0.0
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64  # 0: off, -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0  # always concrete here: a request without a seed gets a random one

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    @property
    def penalized(self) -> bool:
        return self.repeat_last_n != 0 and (
            self.repeat_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    max_new_tokens: int | None = None  # None: until EOS, a stop string or the context end
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    # The grammar state of this one generation (format / a required tool call); the runner
    # masks each step's logits with it and ends the generation when the value is complete.
    constraint: "Constraint | None" = field(default=None, compare=False)
    # [start, end) of each image's positions in the prompt (engine/vision.py): prefill chunks
    # never end inside one
    image_spans: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_options(cls, prompt_ids: list[int] | tuple[int, ...], options: Options, *, logprobs: bool = False,
                     top_logprobs: int = 0, constraint: "Constraint | None" = None,
                     image_spans: tuple[tuple[int, int], ...] = ()) -> "GenerationRequest":
        seed = options.seed if options.seed >= 0 else int.from_bytes(os.urandom(8), "little") >> 1
        sampling = SamplingParams(
            temperature=options.temperature,
            top_k=options.top_k,
            top_p=options.top_p,
            min_p=options.min_p,
            typical_p=options.typical_p,
            repeat_penalty=options.repeat_penalty,
            repeat_last_n=options.repeat_last_n,
            presence_penalty=options.presence_penalty,
            frequency_penalty=options.frequency_penalty,
            seed=seed,
        )
        max_new = options.num_predict if options.num_predict >= 0 else None
        return cls(tuple(prompt_ids), sampling, max_new, tuple(options.stop), logprobs or top_logprobs > 0,
                   top_logprobs, constraint, image_spans)
