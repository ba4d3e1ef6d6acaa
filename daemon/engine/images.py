"""A client's image, decoded and checked before any model sees it.

Images arrive as base64 (the wire layer has checked the alphabet, as Go's decoder does). What
comes out is an RGB picture, or a 400 that says what is wrong: not an image, truncated, too
large to decode safely, too many in one request. An animated image gives its first frame, as
llama.cpp's and Ollama's image loaders do. The processor resizes whatever size is left.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import warnings
from dataclasses import dataclass

from daemon.errors import BadRequest

# The images one request may carry: each costs a pass of the vision tower and its tokens in the
# context (256 for Gemma 3, up to thousands for Qwen2.5-VL), so a hundred never fit a useful
# context anyway; a clear 400 instead of minutes of encoding.
MAX_IMAGES = 32
# Encoded images kept for the next request that sends the same one (a chat resends its
# pictures every turn), by bytes on the model's device (engine/vision.py); the memory estimate
# counts all of it for a vision model.
FEATURES_BUDGET = 512 << 20
# Decoded size in pixels at most: a 20,000 x 20,000 PNG is 1.2 GB of RGB once decoded (its file
# can be a few hundred kilobytes). Processors resize to a few megapixels at most.
MAX_PIXELS = 64 << 20


@dataclass(frozen=True)
class ImageBytes:
    """One image as sent: its bytes and their sha256 (what the prefix cache keys it by)."""

    data: bytes
    digest: str

    @classmethod
    def from_base64(cls, text: str) -> "ImageBytes":
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise BadRequest("invalid image data: not base64") from None
        if not data:
            raise BadRequest("invalid image data: empty image")
        return cls(data, hashlib.sha256(data).hexdigest())


def check_count(count: int) -> None:
    if count > MAX_IMAGES:
        raise BadRequest(f"too many images ({count}): at most {MAX_IMAGES} per request")


def open_image(image: ImageBytes):
    """The image as an RGB PIL image (its first frame), or BadRequest."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            picture = Image.open(io.BytesIO(image.data))  # reads the header only
            width, height = picture.size
            if width <= 0 or height <= 0:
                raise BadRequest("invalid image data: the image has no pixels")
            if width * height > MAX_PIXELS:
                raise BadRequest(f"image too large: {width} x {height} pixels "
                                 f"(at most {MAX_PIXELS >> 20} megapixels)")
            picture.seek(0)  # an animation's first frame
            picture.load()
            return picture.convert("RGB")
    except BadRequest:
        raise
    except UnidentifiedImageError:
        raise BadRequest("invalid image data: not a supported image format (PNG, JPEG, WebP, GIF, BMP, ...)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadRequest(f"image too large (at most {MAX_PIXELS >> 20} megapixels)") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:  # truncated or corrupt data
        raise BadRequest(f"invalid image data: {str(exc) or type(exc).__name__}") from None
