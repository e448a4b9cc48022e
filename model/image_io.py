"""Safe image decoding: bytes from an untrusted corpus → RGB uint8, or a reason why not.

A corpus of millions of scraped illustrations holds every kind of damage: truncated files, HTML saved as
.png, decompression bombs, CMYK JPEGs, 16-bit PNGs, palette images with transparency. Each case is turned
into either a clean RGB array (orientation applied, alpha composited on white, since illustrations are
drawn on white) or a :class:`DecodeError` whose message goes to the job's errors table.
"""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64 * 1024 * 1024  # 8K × 8K: far above any illustration worth training on
MIN_SIDE = 16


class DecodeError(ValueError):
    """An input that cannot become a training image; ``str(err)`` is the reason recorded."""


def content_id(data: bytes) -> str:
    """Deterministic image id: SHA-256 of the file's bytes (same file anywhere → same id)."""
    return hashlib.sha256(data).hexdigest()


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = MIN_SIDE) -> np.ndarray:
    """Decode to (H, W, 3) uint8 RGB. Raises :class:`DecodeError` with the reason."""
    if not data:
        raise DecodeError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise DecodeError(f"too many pixels: {width}x{height} exceeds the cap of {max_pixels}")
            image.load()
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DecodeError(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognized format)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DecodeError(f"corrupt or truncated image: {err}") from None

    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # animated GIF/WebP/APNG: the first frame is the illustration
    image = upright(image)
    width, height = image.size
    if min(width, height) < min_side:
        raise DecodeError(f"too small: {width}x{height} (each side must be at least {min_side})")
    return to_rgb(image)


def upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; a damaged EXIF block leaves the pixels valid, so they are kept as stored."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError):
        return image


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode → RGB uint8; transparency composited on white; 16-bit scaled down, CMYK converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if mode.startswith("I;16") or array.max() > 255 else 255.0
        gray = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "F":
        gray = np.clip(np.asarray(image, dtype=np.float64) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
    return np.asarray(image.convert("RGB"))
