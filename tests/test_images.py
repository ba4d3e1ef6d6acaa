"""A client's image decoded and checked (engine/images.py): what each bad image's 400 says."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from daemon.engine.images import MAX_IMAGES, ImageBytes, check_count, open_image
from daemon.errors import BadRequest


def encoded(picture: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def animated() -> bytes:
    frames = [Image.new("RGB", (8, 6), color) for color in ((255, 0, 0), (0, 255, 0))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_common_formats_give_rgb(fmt):
    picture = open_image(ImageBytes(encoded(Image.new("RGB", (12, 10), (10, 200, 30)), fmt), "x"))
    assert picture.mode == "RGB" and picture.size == (12, 10)


def test_an_animation_gives_its_first_frame_and_other_modes_become_rgb():
    assert open_image(ImageBytes(animated(), "x")).getpixel((0, 0)) == (255, 0, 0)
    assert open_image(ImageBytes(encoded(Image.new("LA", (4, 4))), "x")).mode == "RGB"


BAD = [
    (b"just some text", "not a supported image format"),
    (encoded(Image.new("RGB", (64, 64)))[:60], "invalid image data"),
    (encoded(Image.new("1", (20000, 20000))), "image too large"),
]


@pytest.mark.parametrize("data,message", BAD, ids=["text", "truncated", "huge"])
def test_bad_images_say_what_is_wrong(data, message):
    with pytest.raises(BadRequest) as err:
        open_image(ImageBytes(data, "x"))
    assert message in str(err.value)


def test_a_large_image_under_the_bomb_limit_is_refused_by_its_size():
    wide = encoded(Image.new("1", (12000, 6000)))  # 72 megapixels: PIL opens it, the limit does not
    with pytest.raises(BadRequest, match="image too large: 12000 x 6000 pixels"):
        open_image(ImageBytes(wide, "x"))


def test_base64_and_count():
    image = ImageBytes.from_base64(base64.b64encode(b"abc").decode())
    assert image.data == b"abc" and len(image.digest) == 64
    with pytest.raises(BadRequest, match="empty image"):
        ImageBytes.from_base64("")
    check_count(MAX_IMAGES)
    with pytest.raises(BadRequest, match=f"too many images \\({MAX_IMAGES + 1}\\)"):
        check_count(MAX_IMAGES + 1)
