"""Safe decoding, aspect buckets, sketches and masks: the per-image work of preprocessing."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from PIL import Image

from model.config import sdxl, tiny
from model.geometry import aspect_buckets, buckets_for, crop_to_bucket, letterbox, nearest_bucket
from model.image_io import DecodeError, content_id, decode_image
from model.masks import reference_foreground, sketch_foreground
from model.line_art import CLASSIC_EXTRACTORS, invert
from pipelines.data.synthetic import synthetic_illustration


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    rgb = decode_image(encode(image))
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[5, 5]) == (255, 255, 255) and tuple(rgb[0, 0]) == (255, 0, 0)


def test_palette_with_transparency_grayscale_cmyk_and_16_bit_become_rgb():
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.info["transparency"] = 0
    assert tuple(decode_image(encode(palette))[0, 0]) == (10, 200, 30)
    gray = Image.new("L", (20, 20), 128)
    assert tuple(decode_image(encode(gray))[0, 0]) == (128, 128, 128)
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))  # pure red in CMYK
    red = decode_image(encode(cmyk, "JPEG", quality=100))[10, 10]
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    deep = Image.fromarray(np.full((20, 20), 65535, np.uint16))
    assert tuple(decode_image(encode(deep))[0, 0]) == (255, 255, 255)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    rgb = decode_image(encode(image, "JPEG", exif=exif.tobytes()))
    assert rgb.shape[:2] == (40, 20)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"<html>not found</html>", "not an image"),
    (encode(Image.new("RGB", (64, 64)))[:60], "corrupt or truncated"),
    (encode(Image.new("RGB", (8, 8))), "too small: 8x8"),
])
def test_bad_inputs_raise_with_a_reason(data, reason):
    with pytest.raises(DecodeError, match=reason):
        decode_image(data)


def test_pixel_cap_stops_decompression_bombs_before_decoding():
    bomb = encode(Image.new("L", (4000, 4000)), optimize=True)  # a few KB that would expand to 16 MP
    assert len(bomb) < 100_000
    with pytest.raises(DecodeError, match="too many pixels: 4000x4000"):
        decode_image(bomb, max_pixels=1_000_000)


def test_content_id_is_the_sha256_of_the_bytes():
    assert content_id(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_buckets_are_symmetric_about_one_megapixel_on_the_grid():
    buckets = buckets_for(sdxl())
    assert (1024, 1024) in buckets and (736, 1312) in buckets and (1312, 736) in buckets
    for width, height in buckets:
        assert width % 32 == 0 and height % 32 == 0
        assert 0.9 * 1024**2 <= width * height <= 1024**2
        assert (height, width) in buckets
    assert buckets_for(tiny()) == [(96, 160), (128, 128), (160, 96)]
    with pytest.raises(ValueError, match="no bucket fits"):
        aspect_buckets(100, 32, 64, 64)


def test_nearest_bucket_follows_the_aspect_ratio():
    buckets = buckets_for(sdxl())
    assert nearest_bucket(3000, 3000, buckets) == (1024, 1024)
    assert nearest_bucket(1920, 1080, buckets) == (1312, 736)
    wide = nearest_bucket(1000, 800, buckets)
    ratio = wide[0] / wide[1]
    assert ratio > 1.15 and ratio < 1.35


def test_crop_covers_and_letterbox_keeps_everything():
    image = np.zeros((100, 300, 3), np.uint8)
    image[:, :10] = 255  # a white band at the far left edge
    cropped = crop_to_bucket(image, (128, 128))
    assert cropped.shape == (128, 128, 3)
    assert cropped[:, :5].mean() < 10  # the center crop dropped the left band
    boxed = letterbox(image, (128, 128))
    assert boxed.shape == (128, 128, 3)
    assert boxed[0].mean() == 255 and boxed[64, :3].mean() == 255  # padding rows and the band are there


def test_four_classic_extractors_draw_four_different_line_styles():
    picture = synthetic_illustration(seed=4, width=160, height=128)
    drawings = {name: fn(picture.color) for name, fn in CLASSIC_EXTRACTORS.items()}
    lines = cv2.dilate((picture.sketch < 128).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # near a true line
    for name, drawing in drawings.items():
        assert drawing.shape == (128, 160) and drawing.dtype == np.uint8
        assert drawing.mean() > 150, f"{name} should be mostly white paper"
        # strokes land on the true outlines far more often than elsewhere
        assert drawing[lines].mean() + 30 < drawing[~lines].mean(), name
    names = list(drawings)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert np.abs(drawings[a].astype(int) - drawings[b].astype(int)).mean() > 2, (a, b)
    assert np.array_equal(invert(invert(drawings["xdog"])), drawings["xdog"])


def test_masks_separate_a_drawn_figure_from_its_backdrop():
    canvas = np.full((96, 96, 3), 255, np.uint8)
    canvas[30:70, 30:70] = (200, 40, 40)
    mask = reference_foreground(canvas)
    assert mask[50, 50] == 255 and mask[5, 5] == 0
    drawing = np.full((96, 96), 255, np.uint8)
    drawing[30, 30:70] = drawing[69, 30:70] = 0
    drawing[30:70, 30] = drawing[30:70, 69] = 0
    sketch_mask = sketch_foreground(drawing)
    assert sketch_mask[50, 50] == 255 and sketch_mask[5, 5] == 0
