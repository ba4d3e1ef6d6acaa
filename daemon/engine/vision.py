"""A vision model's images as prompt tokens: its processor, its vision tower, and the virtual
token ids that its image positions take.

How an image reaches the language model, on every decode path alike:
- `prepare` (a worker thread): the picture through the model's own processor, with a prompt of
  only the image's placeholder. That gives the pixel tensors and the text the placeholder
  expands to (Gemma 3's `<start_of_image>` becomes a blank line, 256 soft tokens and
  `<end_of_image>`; LLaVA's `<image>` one token per patch), which replaces the placeholder in
  the rendered prompt, which is then tokenized whole, as the processor tokenizes it.
- The image's positions get *virtual token ids* past the vocabulary, one per image token,
  allocated per image content (the sha256 of its bytes) and never given to another image: the
  runner, its chunking and the prefix cache see plain ids, so the next turn of a conversation
  about the same picture reuses its cached keys and values and a different picture never can.
- `encode` (the runner's thread): the vision tower, through the model's own forward, stopped
  where it hands its merged embeddings to the language model (a hook on the language model),
  so every family's projector, feature layer and merging run as transformers runs them.
- The decode paths look rows up in the embedding table, and virtual ids' rows here (`embed`).
Gemma 3 attends bidirectionally among one image's tokens (its processor marks them with token
type ids, as transformers' generate() uses them): `bidirectional`, and `horizons` says where.
Qwen2-VL's family places an image's tokens by multimodal rotary positions (time, row, column,
each rotating its own section of a head's frequencies) and the text after it by where the image
ends, not by index: `rotary_positions`, as its get_rope_index computes them.
"""

from __future__ import annotations

import bisect
import collections
import threading
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from daemon.engine.images import FEATURES_BUDGET, ImageBytes, open_image
from daemon.engine.spec import decoder
from daemon.errors import BadRequest, InternalError

# (FEATURES_BUDGET: the encoded images kept; an image a request still needs is kept regardless.)
# Images whose virtual ids are remembered (a few integers each): an image forgotten and sent
# again gets new ids, which only costs the prefix cache's hit.
KNOWN_IMAGES = 4096


@dataclass(frozen=True)
class ImageTokens:
    """One image's place in prompts: `count` image-token positions with virtual ids `first`
    .. `first + count - 1`, and the prompt text its placeholder expands to."""

    digest: str
    first: int
    count: int
    text: str
    grid: tuple[int, int, int] | None = None  # multimodal rotary models: tokens in time, rows, columns

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.count)


class _Stop(Exception):
    """Raised by the hook on the language model: the embeddings are in, nothing more to run."""

    def __init__(self, kwargs: dict[str, Any]) -> None:
        self.kwargs = kwargs


class Vision:
    def __init__(self, model: torch.nn.Module, processor: Any, vocab_rows: int) -> None:
        self.model = model
        self.processor = processor
        tokenizer = processor.tokenizer
        # what a chat template writes for an image, which the processor expands: Gemma 3's
        # begin-of-image token, else the image token itself (LLaVA's <image>, Qwen's image pad)
        self.placeholder: str = getattr(processor, "boi_token", None) or processor.image_token
        # what goes where a Go template or a raw prompt places an image: the placeholder, inside
        # the markers the model's own template writes around it where its config names them
        # (Qwen2-VL's <|vision_start|> .. <|vision_end|>, as Ollama's qwen25vl model adds them)
        self.inserted: str = self.placeholder
        config = model.config
        marks = [getattr(config, f"vision_{side}_token_id", None) for side in ("start", "end")]
        if all(isinstance(m, int) for m in marks):
            start, end = tokenizer.convert_ids_to_tokens(marks)
            self.inserted = f"{start}{self.placeholder}{end}"
        # the token whose positions the features replace, as the model's forward finds them (Gemma
        # 3's processor calls its begin-of-image token `image_token`; the config names the soft one)
        image_token_id = getattr(config, "image_token_id", None)
        if not isinstance(image_token_id, int):
            image_token_id = getattr(config, "image_token_index", None)
        self.image_token_id: int = (image_token_id if isinstance(image_token_id, int)
                                    else tokenizer.convert_tokens_to_ids(processor.image_token))
        self.first_virtual = max(vocab_rows, len(tokenizer))
        self.bidirectional = False  # learned from the processor's first output
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        # Qwen2-VL's family: images placed by (time, row, column); the vision tower merges
        # merge x merge patches into one token
        self.multimodal_rotary = isinstance(rope, dict) and "mrope_section" in rope
        vision_config = getattr(config, "vision_config", None)
        self._merge = int(getattr(vision_config, "spatial_merge_size", 1) or 1)
        # per slot of the decode path: (end, shift) where each image in it ends, ascending; a row
        # at index i past the last image sits at rotary position i + shift
        self._image_ends: dict[int, list[tuple[int, int]]] = {}
        parameters = [p for p in model.parameters() if p.is_floating_point()]
        self.device = parameters[0].device
        self._lock = threading.Lock()
        self._next = self.first_virtual
        self._known: collections.OrderedDict[str, ImageTokens] = collections.OrderedDict()
        self._firsts: list[int] = []  # of every allocation, ascending
        self._by_first: dict[int, ImageTokens] = {}
        self._features: collections.OrderedDict[int, torch.Tensor] = collections.OrderedDict()
        self._pins: collections.Counter[int] = collections.Counter()

    # ---- preparing (any thread) ---------------------------------------------------------

    def prepare(self, image: ImageBytes) -> tuple[ImageTokens, Any]:
        """The image's tokens, and the processor's tensors when its features are still to be
        computed (None when they are held). Its features are pinned: `unpin` its `first`."""
        with self._lock:
            known = self._known.get(image.digest)
            if known is not None:
                self._known.move_to_end(image.digest)
                if known.first in self._features:
                    self._pins[known.first] += 1
                    return known, None
        picture = open_image(image)
        try:
            inputs = self.processor(text=self.placeholder, images=[picture], return_tensors="pt",
                                    add_special_tokens=False)
        except Exception as exc:  # an image the processor cannot take (a 1 x 1 pixel one, say)
            raise BadRequest(f"invalid image: the model's processor refused it ({exc})") from None
        ids = inputs["input_ids"][0]
        count = int((ids == self.image_token_id).sum())
        if count == 0:
            raise InternalError("the processor gave no image tokens for an image")
        if "token_type_ids" in inputs:  # the processor marks image tokens: they see each other
            self.bidirectional = True
        text = self.processor.tokenizer.decode(ids.tolist(), skip_special_tokens=False,
                                               clean_up_tokenization_spaces=False)
        grid = None
        if self.multimodal_rotary:
            frames, height, width = (int(v) for v in inputs["image_grid_thw"][0])
            grid = (frames, height // self._merge, width // self._merge)
            if grid[0] * grid[1] * grid[2] != count:
                raise InternalError(f"an image grid of {grid} for {count} image tokens")
        with self._lock:
            tokens = self._known.get(image.digest)
            if tokens is None or tokens.count != count:
                tokens = ImageTokens(image.digest, self._next, count, text, grid)
                self._next += count + 1  # a gap: two images' ids are never consecutive
                self._firsts.append(tokens.first)
                self._by_first[tokens.first] = tokens
                self._known[image.digest] = tokens
                for digest in list(self._known):  # the oldest unpinned forgotten: their ids never valid again
                    if len(self._known) <= KNOWN_IMAGES:
                        break
                    old = self._known[digest]
                    if old.first in self._pins:
                        continue
                    del self._known[digest]
                    del self._by_first[old.first]
                    self._firsts.remove(old.first)
                    self._features.pop(old.first, None)
            self._pins[tokens.first] += 1
        return tokens, inputs

    # ---- encoding (the runner's thread) -------------------------------------------------

    @torch.inference_mode()
    def encode(self, tokens: ImageTokens, inputs: Any) -> None:
        """The image's embeddings as the language model would receive them, kept for `embed`."""
        with self._lock:
            if tokens.first in self._features:
                return
        dtype = self.model.dtype if self.model.dtype.is_floating_point else torch.float32
        kwargs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device))
                  for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        ids = kwargs["input_ids"]
        positions = torch.arange(ids.shape[1], device=self.device)[None]
        if "image_grid_thw" in kwargs:  # multimodal rotary positions: given, so none are derived here
            positions = positions[None].expand(3, -1, -1)
        kwargs.pop("token_type_ids", None)
        kwargs.pop("mm_token_type_ids", None)

        def stop(module: torch.nn.Module, args: tuple, given: dict[str, Any]) -> None:
            raise _Stop(given)

        hook = decoder(self.model).register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**kwargs, position_ids=positions, use_cache=False)
        except _Stop as stopped:
            embeds = stopped.kwargs.get("inputs_embeds")
        else:
            raise InternalError("the model ran without handing image embeddings to its language model")
        finally:
            hook.remove()
        if embeds is None:
            raise InternalError("the model's language model received no embeddings")
        features = embeds[0][ids[0] == self.image_token_id]
        if features.shape[0] != tokens.count:
            raise InternalError(f"{features.shape[0]} image embeddings for {tokens.count} image tokens")
        with self._lock:
            self._features[tokens.first] = features.detach().clone()
            self._evict()

    def _evict(self) -> None:
        held = sum(f.numel() * f.element_size() for f in self._features.values())
        for first in list(self._features):
            if held <= FEATURES_BUDGET:
                break
            if first in self._pins:
                continue
            feature = self._features.pop(first)
            held -= feature.numel() * feature.element_size()

    def warm_up(self) -> None:
        """A picture through the processor and the tower at load, forgotten after: the first
        request's image then pays for neither's first run (on a GPU about a second, its kernels
        chosen and loaded). The size is the usual photo's after resizing (Gemma 3 and LLaVA
        resize every picture to one size anyway)."""
        import io

        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (896, 896), (128, 128, 128)).save(buffer, format="PNG")
        # a digest no picture has (theirs are sha256 hex): never matched by a request's image
        tokens, inputs = self.prepare(ImageBytes(buffer.getvalue(), "warm-up"))
        try:
            if inputs is not None:
                self.encode(tokens, inputs)
        finally:
            self.unpin([tokens.first])
            with self._lock:
                self._features.pop(tokens.first, None)

    def held(self) -> dict[str, int]:
        """The encoded images kept (/api/ps): how many, their bytes, and the budget."""
        with self._lock:
            count, size = len(self._features), sum(f.numel() * f.element_size() for f in self._features.values())
        return {"held": count, "bytes": size, "budget": FEATURES_BUDGET}

    def has_features(self, tokens: ImageTokens) -> bool:
        with self._lock:
            return tokens.first in self._features

    # ---- requests -----------------------------------------------------------------------

    def pin(self, ids: Sequence[int]) -> list[int]:
        """Keep the features of every image the prompt `ids` holds until `unpin`; a virtual id
        of an image no longer held (a `context` from long ago) is the client's 400."""
        firsts = sorted({self._entry(i).first for i in ids if i >= self.first_virtual})
        with self._lock:
            missing = [f for f in firsts if f not in self._features]
            if missing:
                raise BadRequest("the context refers to an image that is no longer held: send the image again")
            self._pins.update(firsts)
        return firsts

    def unpin(self, firsts: list[int]) -> None:
        with self._lock:
            self._pins.subtract(firsts)
            self._pins += collections.Counter()  # drops the zeros
            self._evict()

    def substitute(self, ids: list[int], images: Sequence[ImageTokens]) -> list[int]:
        """The prompt with its image tokens given their images' virtual ids: the image tokens in
        order are the newest images' (a prompt cut to fit the context loses the oldest turns,
        their images with them). A cut through an image is the client's 400."""
        places = [i for i, t in enumerate(ids) if t == self.image_token_id]
        kept, total = [], 0
        for image in reversed(images):
            if total >= len(places):
                break
            kept.append(image)
            total += image.count
        if total != len(places):
            raise BadRequest("the images do not fit the context: send fewer images or set a larger num_ctx")
        out = list(ids)
        virtual = [v for image in reversed(kept) for v in image.ids]
        for place, v in zip(places, virtual):
            out[place] = v
        return out

    def spans(self, ids: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """[start, end) of each image's run of positions in a prompt: the runner never ends a
        prefill chunk inside one (an image's tokens see each other on a bidirectional model)."""
        spans, start = [], None
        for i, t in enumerate(ids):
            inside = t >= self.first_virtual
            if inside and (start is None or t != ids[i - 1] + 1):
                if start is not None:
                    spans.append((start, i))
                start = i
            elif not inside and start is not None:
                spans.append((start, i))
                start = None
        if start is not None:
            spans.append((start, len(ids)))
        return tuple(spans)

    # ---- the decode paths ---------------------------------------------------------------

    def _entry(self, virtual: int) -> ImageTokens:
        index = bisect.bisect_right(self._firsts, virtual) - 1
        entry = self._by_first.get(self._firsts[index]) if index >= 0 else None
        if entry is None or virtual >= entry.first + entry.count:
            raise BadRequest(f"token id {virtual} is past the model's vocabulary")
        return entry

    def embed(self, ids: torch.Tensor, lookup: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """`lookup(ids)` (the embedding table, scaled where the family scales it) with the rows
        of virtual ids taken from their images' features. `ids` on the host, any shape."""
        virtual = ids >= self.first_virtual
        if not bool(virtual.any()):
            return lookup(ids.to(self.device))
        x = lookup(ids.masked_fill(virtual, 0).to(self.device))
        wanted = ids[virtual].tolist()
        rows, i = [], 0
        with self._lock:
            while i < len(wanted):
                entry = self._entry(wanted[i])
                j = i
                while j + 1 < len(wanted) and wanted[j + 1] == wanted[j] + 1 and wanted[j + 1] < entry.first + entry.count:
                    j += 1
                features = self._features.get(entry.first)
                if features is None:
                    raise InternalError("an image's features were dropped before its prompt was computed")
                offset = wanted[i] - entry.first
                rows.append(features[offset:offset + j - i + 1])
                i = j + 1
        x[virtual.to(x.device)] = torch.cat(rows).to(x.dtype)
        return x

    def rotary_positions(self, slot: int, start: int, ids: Sequence[int]) -> np.ndarray | None:
        """Multimodal rotary models: the (time, row, column) rotary positions [3, T] of `ids` at
        index start... of `slot` (for transformers' get_rope_index on the whole sequence: text at
        the position after what precedes it on all three; an image's tokens at its first
        position plus their frame, row and column; after an image, max(frames, rows, columns)
        positions on), remembering where this chunk's images end for the slot's later rows. None
        where every position is its index (other models, and text before any image)."""
        if not self.multimodal_rotary:
            return None
        ends = self._image_ends.setdefault(slot, [])
        del ends[bisect.bisect_right(ends, (start, float("inf"))):]  # rows from `start` on are rewritten
        shift = ends[-1][1] if ends else 0
        tokens = np.asarray(ids, dtype=np.int64)
        virtual = tokens >= self.first_virtual
        if shift == 0 and not virtual.any():
            return None
        index = np.arange(start, start + len(tokens), dtype=np.int64)
        out = np.empty((3, len(tokens)), dtype=np.int64)
        i = 0
        with self._lock:
            while i < len(tokens):
                if not virtual[i]:  # a run of text
                    j = i + int(np.argmax(virtual[i:])) if virtual[i:].any() else len(tokens)
                    out[:, i:j] = index[i:j] + shift
                    i = j
                    continue
                entry = self._entry(int(tokens[i]))
                offset = int(tokens[i]) - entry.first  # the chunk may start inside the image
                n = min(entry.count - offset, len(tokens) - i)
                if not np.array_equal(tokens[i:i + n], np.arange(tokens[i], tokens[i] + n)):
                    raise BadRequest("an image's tokens out of order in the prompt")
                frames, rows, columns = entry.grid
                k = np.arange(offset, offset + n)
                first = start + i - offset + shift  # the image's first rotary position
                out[0, i:i + n] = first + k // (rows * columns)
                out[1, i:i + n] = first + (k // columns) % rows
                out[2, i:i + n] = first + k % columns
                i += n
                if offset + n == entry.count:  # the image ends here: what follows starts past it
                    shift += max(frames, rows, columns) - entry.count
                    ends.append((start + i, shift))
        return out

    def pass_positions(self, rows: Sequence[tuple[Sequence[int], int, int]]) -> np.ndarray | None:
        """`rotary_positions` of a pass's rows ((ids, slot, start) each: a decode row's one token
        or a prompt chunk), side by side [3, total]; None where every row's are its indexes."""
        placed = [self.rotary_positions(slot, start, ids) for ids, slot, start in rows]
        if all(p is None for p in placed):
            return None
        return np.concatenate([p if p is not None else np.broadcast_to(np.arange(start, start + len(ids)), (3, len(ids)))
                               for p, (ids, slot, start) in zip(placed, rows)], axis=1)

    def copy_rotary(self, source: int, targets: Sequence[int], length: int) -> None:
        """Slots `targets` take slot `source`'s first `length` rows (the decode paths' copy_prefix)."""
        if not self.multimodal_rotary:
            return
        kept = [end for end in self._image_ends.get(source, []) if end[0] <= length]
        for target in targets:
            self._image_ends[target] = list(kept)

    def horizons(self, ids: Sequence[int], start: int) -> list[int] | None:
        """Bidirectional models: the last key position each of a chunk's rows sees (its own for
        text, its image's last for an image token), for ids at positions start...; else None."""
        if not self.bidirectional:
            return None
        spans = self.spans(ids)
        if not spans:
            return None
        out = list(range(start, start + len(ids)))
        for a, b in spans:
            out[a:b] = [start + b - 1] * (b - a)
        return out
