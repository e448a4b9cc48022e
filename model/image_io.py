"""Safe image decoding: bytes from an untrusted source → RGB uint8, or a reason why not.

A corpus of millions of scraped illustrations holds every kind of damage: truncated files, HTML saved as
.png, decompression bombs, CMYK JPEGs, 16-bit PNGs, palette images with transparency; the HTTP API gets
whatever files artists' tools (and attackers) send. Each case is turned into either a clean RGB array
(orientation applied, alpha composited on white, since illustrations are drawn on white) or a
:class:`DecodeError` whose message goes to the job's errors table or to the client.

What keeps a hostile file cheap:

- ``formats`` (the API passes :data:`API_FORMATS`): only those Pillow plugins even parse the bytes, and the
  detected format (never a file name) decides; ``None`` lets every plugin try, as preprocessing always has.
- Only the first frame is ever read: frames are never counted (a TIFF's page count walks every page).
- The pixel cap and the memory estimate (:func:`decode_cost`) are checked from the header, before decoding.
- The conversion to RGB works in strips written into the output array: the peak is the decoded image plus
  the 3-byte RGB result, never a float64 or several full-size RGBA copies.
- Any exception a plugin raises while opening, decoding or converting becomes a :class:`DecodeError`.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8K × 8K: far above any illustration worth training on
MIN_SIDE = 16
API_FORMATS = ("PNG", "JPEG", "WEBP")  # what the HTTP API decodes (Pillow's format names)
_ALSO = {"MPO": "JPEG"}  # the JPEG plugin reports a multi-picture JPEG (phone photos) as MPO
# Bytes a pixel in Pillow's storage while decoded, by mode (others: 4, as RGB, RGBA, CMYK, I and F are).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
# Full-size buffers a decoder holds besides the image, in bytes a pixel: libwebp's canvas and the frame's
# bytes that Pillow copies from.
_DECODER_BYTES = {"WEBP": 8}
_STRIP_PIXELS = 1 << 18  # pixels converted at a time: a few MB of temporaries whatever the image size
_STRIP_BYTES = 32 * _STRIP_PIXELS  # what the strips' temporaries can cost at most
_WHITE = (255, 255, 255)
_ROTATIONS = {  # EXIF orientation → the view of the stored (H, W, 3) array that shows it upright
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1),
}


class DecodeError(ValueError):
    """An input that cannot become an RGB image; ``str(err)`` is the reason recorded or sent.

    ``too_large`` tells a refusal by size (pixels, memory) from a broken or unaccepted file.
    """

    def __init__(self, reason: str, too_large: bool = False):
        super().__init__(reason)
        self.too_large = too_large


def content_id(data: bytes) -> str:
    """Deterministic image id: SHA-256 of the file's bytes (same file anywhere → same id)."""
    return hashlib.sha256(data).hexdigest()


def decode_cost(width: int, height: int, mode: str, format: str | None = None) -> int:
    """Peak bytes :func:`decode_image` needs for an image of this header: the decoded pixels in Pillow's
    storage (1, 2 or 4 bytes a pixel by mode) and the decoder's own buffers, plus the RGB result (3 bytes a
    pixel); turning it upright later costs a second RGB array once the decoded image is freed."""
    pixels = width * height
    held = _STORED_BYTES.get(mode, 4) + _DECODER_BYTES.get(format or "", 0)
    return pixels * max(held + 3, 6) + _STRIP_BYTES


def _short(err: BaseException, limit: int = 160) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE,
                 formats: tuple[str, ...] | None = None, max_bytes: int | None = None,
                 max_aspect: float | None = None) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB. Raises :class:`DecodeError` with the reason.

    ``formats``: Pillow format names to accept (None: any format Pillow knows). ``max_bytes``: refuse an
    image whose :func:`decode_cost` is higher. ``max_aspect``: refuse one whose long side is more than this
    many times its short side. All three are checked from the header, before the pixels are decoded.
    """
    if not data:
        raise DecodeError("empty file")
    allowed = None if formats is None else tuple(formats)
    image = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            try:
                image = Image.open(io.BytesIO(data), formats=allowed)
            except UnidentifiedImageError:
                if allowed is None:
                    raise DecodeError("not an image (unrecognized format)") from None
                raise DecodeError("not an image, or not in an accepted format (accepted: "
                                  + ", ".join(allowed) + ")") from None
            if allowed is not None and _ALSO.get(image.format, image.format) not in allowed:
                raise DecodeError(f"format {image.format} is not accepted (accepted: {', '.join(allowed)})")
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(f"too many pixels: {width}x{height} exceeds the cap of {max_pixels}",
                                  too_large=True)
            if min(width, height) < min_side:
                raise DecodeError(f"too small: {width}x{height} (each side must be at least {min_side})")
            if max_aspect is not None and max(width, height) > max_aspect * min(width, height):
                raise DecodeError(f"aspect ratio of {width}x{height} is outside the accepted range "
                                  f"1:{max_aspect:g} to {max_aspect:g}:1")
            if max_bytes is not None:
                cost = decode_cost(width, height, image.mode, image.format)
                if cost > max_bytes:
                    raise DecodeError(f"a {width}x{height} {image.mode} image needs about {cost // 2**20} MiB "
                                      f"to decode, over the memory budget of {max_bytes // 2**20} MiB",
                                      too_large=True)
            image.load()  # the first frame: an animation or a multi-page file is never walked
            orientation = _orientation(image)
            rgb = to_rgb(image)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {_short(err)}", too_large=True) from None
    except MemoryError:
        raise DecodeError("not enough memory to decode this image", too_large=True) from None
    except Exception as err:  # noqa: BLE001 - plugins raise anything on hostile bytes (TypeError, struct.error...)
        raise DecodeError(f"corrupt or truncated image: {_short(err)}") from None
    finally:
        if image is not None:
            image.close()  # frees the decoded pixels before the result is turned upright
    if orientation in _ROTATIONS:
        rgb = np.ascontiguousarray(_ROTATIONS[orientation](rgb))
    return rgb


def _orientation(image: Image.Image) -> int:
    """The EXIF (or XMP) orientation, 1 when absent; a damaged EXIF block leaves the pixels as stored."""
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - EXIF parsing of hostile files raises anything
        return 1


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode → (H, W, 3) uint8 RGB; transparency composited on white; 16-bit and wider scaled down
    (the high byte), float images taken as 0..1, CMYK converted. Works in strips written into the result,
    so the peak is the image plus 3 bytes a pixel."""
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    convert = _strip_converter(image)
    rows = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        out[top:bottom] = convert(image.crop((0, top, width, bottom)))
    return out


def _strip_converter(image: Image.Image):
    mode = image.mode
    if mode.startswith("I;16"):
        return lambda strip: (np.asarray(strip) >> 8).astype(np.uint8)[..., None]
    if mode == "L":  # gray: the one channel broadcast into the three
        return lambda strip: np.asarray(strip)[..., None]
    if mode == "I":  # 32-bit integers: 16-bit data when any value passes 255 (as a 16-bit PNG or TIFF)
        low, high = image.getextrema()
        if high > 255:
            return lambda strip: (np.clip(np.asarray(strip), 0, 65535) >> 8).astype(np.uint8)[..., None]
        return lambda strip: np.clip(np.asarray(strip), 0, 255).astype(np.uint8)[..., None]
    if mode == "F":
        def floats(strip):
            values = np.nan_to_num(np.asarray(strip, dtype=np.float32), nan=0.0)
            return np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8)[..., None]
        return floats
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        def over_white(strip):
            rgba = strip if strip.mode == "RGBA" else strip.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, _WHITE)
            canvas.paste(rgba, mask=rgba)
            return np.asarray(canvas)
        return over_white
    return lambda strip: np.asarray(strip if strip.mode == "RGB" else strip.convert("RGB"))
