"""Embeddings: an encoder model's pipeline as its sentence-transformers config describes it
(pooling: mean / cls / max / last token; Normalize when listed), or a generate model's last
hidden state, mean pooled, as Ollama allows."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daemon.errors import BadRequest

CONTEXT_EXCEEDED = "the input length exceeds the context length"


@dataclass(frozen=True)
class Pooling:
    mode: str = "mean"  # mean | cls | max | last
    normalize: bool = False
    max_seq_length: int | None = None


def read_pooling(folder: Path) -> Pooling:
    """From modules.json, the Pooling module's config and sentence_bert_config.json."""
    mode, normalize, max_len = "mean", False, None
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        for module in json.loads(modules_file.read_text()):
            kind = module.get("type", "")
            if kind.endswith("Normalize"):
                normalize = True
            if kind.endswith("Pooling"):
                cfg_file = folder / module.get("path", "") / "config.json"
                cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
                if cfg.get("pooling_mode_cls_token"):
                    mode = "cls"
                elif cfg.get("pooling_mode_max_tokens"):
                    mode = "max"
                elif cfg.get("pooling_mode_lasttoken"):
                    mode = "last"
    st_config = folder / "sentence_bert_config.json"
    if st_config.is_file():
        max_len = json.loads(st_config.read_text()).get("max_seq_length")
    return Pooling(mode, normalize, max_len)


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """hidden [B, T, H], mask [B, T] (1 = token) -> [B, H] in fp32."""
    hidden, m = hidden.float(), mask.unsqueeze(-1).float()
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(m == 0, float("-inf")).max(dim=1).values
    if mode == "last":
        last = mask.sum(dim=1).long() - 1
        return hidden[torch.arange(hidden.shape[0]), last]
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    token_counts: list[int]


class EncoderEmbedder:
    """An encoder (BERT-like) model with its pooling; one batch at a time (a lock: the
    model's intra-op threads are shared)."""

    def __init__(self, model: Any, tokenizer: Any, pooling: Pooling, context: int) -> None:
        self.model, self.tokenizer, self.pooling, self.context = model, tokenizer, pooling, context
        self._lock = threading.Lock()

    @torch.inference_mode()
    def embed(self, texts: list[str], truncate: bool) -> EmbedResult:
        with self._lock:
            ids = [self.tokenizer.encode(t, add_special_tokens=True) for t in texts]
            if not truncate and any(len(i) > self.context for i in ids):
                raise BadRequest(CONTEXT_EXCEEDED)
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.context, return_tensors="pt")
            enc = {k: v.to(self.model.device) for k, v in enc.items()}
            hidden = self.model(**enc).last_hidden_state
            vectors = pool(hidden, enc["attention_mask"], self.pooling.mode)
            if self.pooling.normalize:
                vectors = torch.nn.functional.normalize(vectors, dim=-1)
            counts = enc["attention_mask"].sum(dim=1).tolist()
            return EmbedResult(vectors.cpu().tolist(), [int(c) for c in counts])


def l2_normalize(vector: list[float], dimensions: int | None = None) -> list[float]:
    """Ollama's /api/embed normalization (and `dimensions`: keep the first N, renormalize)."""
    import math

    if any(math.isnan(v) or math.isinf(v) for v in vector):
        raise BadRequest("embedding contains NaN or Inf values")
    if dimensions and 0 < dimensions < len(vector):
        vector = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in vector))
    scale = 1.0 / max(norm, 1e-12)
    return [v * scale for v in vector]
