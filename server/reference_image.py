"""Reference images (the avatar's identity): from a file, from a browser data URL, or a drawn default.

Everything that arrives from the network is checked here before any model sees it.
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ACCEPTED_MEDIA_TYPES = ("image/png", "image/jpeg", "image/webp")
MAX_REFERENCE_PIXELS = 4096 * 4096
MIN_REFERENCE_SIDE = 16
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")
# 8-bit modes that convert to RGB faithfully; 16-bit/float ones (I;16, I, F) would clip to white
ACCEPTED_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")


class ReferenceImageError(ValueError):
    """The reference image could not be used; the message says why and what to send instead."""


def image_from_bytes(data: bytes, source: str) -> np.ndarray:
    """Decode PNG/JPEG/WebP bytes into uint8 RGB [H, W, 3], refusing empty, huge or tiny images."""
    if not data:
        raise ReferenceImageError(f"reference image from {source} is empty (0 bytes); send a PNG, JPEG or WebP")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            width, height = probe.size
            if probe.format not in ACCEPTED_FORMATS:
                raise ReferenceImageError(
                    f"reference image from {source} is {probe.format or 'an unknown format'}; send a PNG, JPEG "
                    "or WebP")
            if probe.mode not in ACCEPTED_MODES:
                raise ReferenceImageError(
                    f"reference image from {source} has pixel mode {probe.mode!r} (16-bit or float samples); "
                    "save it as an 8-bit RGB PNG or JPEG")
            if width * height > MAX_REFERENCE_PIXELS:
                raise ReferenceImageError(
                    f"reference image from {source} is {width}x{height} ({width * height / 1e6:.1f} MP); "
                    f"the limit is {MAX_REFERENCE_PIXELS / 1e6:.1f} MP, scale it down")
            if min(width, height) < MIN_REFERENCE_SIDE:
                raise ReferenceImageError(
                    f"reference image from {source} is {width}x{height}; both sides must be at least "
                    f"{MIN_REFERENCE_SIDE} px")
            rgb = probe.convert("RGB")
            rgb.load()
    except ReferenceImageError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ReferenceImageError(
            f"reference image from {source} is not a readable PNG, JPEG or WebP image ({exc})") from None
    return np.asarray(rgb, dtype=np.uint8).copy()


def image_from_data_url(data_url: str, max_bytes: int) -> np.ndarray:
    """Decode a `data:image/...;base64,...` URL as sent by the page's image picker."""
    if not isinstance(data_url, str) or not data_url.startswith("data:"):
        raise ReferenceImageError("reference_image must be a data URL (data:image/png;base64,...)")
    header, sep, payload = data_url.partition(",")
    media_type = header[len("data:"):].split(";")[0].strip().lower()
    if not sep or ";base64" not in header:
        raise ReferenceImageError("reference_image must be a base64 data URL (data:image/png;base64,...)")
    if media_type not in ACCEPTED_MEDIA_TYPES:
        raise ReferenceImageError(
            f"reference_image has type {media_type or 'none'!r}; send one of {', '.join(ACCEPTED_MEDIA_TYPES)}")
    if len(payload) * 3 // 4 > max_bytes:
        raise ReferenceImageError(
            f"reference_image is about {len(payload) * 3 // 4} bytes; the limit is {max_bytes} bytes, "
            "send a smaller image")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ReferenceImageError("reference_image is not valid base64") from None
    return image_from_bytes(data, "the page")


def image_from_file(path: str | Path) -> np.ndarray:
    """Read the reference image named by `--reference`."""
    path = Path(path)
    if not path.is_file():
        raise ReferenceImageError(f"--server.reference: no such file {str(path)!r}")
    return image_from_bytes(path.read_bytes(), str(path))


def reference_or_drawn(reference_path: str | Path | None) -> np.ndarray:
    """The face used when a run names none: the `--server.reference` file if set, else the drawn face
    (the live server and the offline CLI show the same one)."""
    return image_from_file(reference_path) if reference_path else drawn_reference()


def drawn_reference(height: int = 512, width: int = 512, mouth_opening: float = 0.0) -> np.ndarray:
    """A simple drawn face, so the server shows someone even when no reference image was given.

    `mouth_opening` (0 closed .. 1 wide) draws it talking: the training data teaches the tiny avatar this face.
    """
    image = Image.new("RGB", (width, height), (70, 96, 128))
    draw = ImageDraw.Draw(image)
    cx, cy = width / 2, height * 0.48
    fw, fh = width * 0.30, height * 0.38
    draw.rectangle([cx - width * 0.34, cy + fh * 0.85, cx + width * 0.34, height], fill=(40, 52, 70))
    draw.rectangle([cx - fw * 0.3, cy + fh * 0.7, cx + fw * 0.3, cy + fh * 1.05], fill=(214, 170, 140))
    draw.ellipse([cx - fw, cy - fh, cx + fw, cy + fh], fill=(226, 184, 152))
    draw.chord([cx - fw * 1.05, cy - fh * 1.1, cx + fw * 1.05, cy - fh * 0.05], 180, 360, fill=(60, 40, 30))
    for side in (-1, 1):
        ex = cx + side * fw * 0.4
        ey = cy - fh * 0.1
        draw.ellipse([ex - fw * 0.16, ey - fh * 0.07, ex + fw * 0.16, ey + fh * 0.07], fill=(250, 250, 250))
        draw.ellipse([ex - fw * 0.07, ey - fh * 0.06, ex + fw * 0.07, ey + fh * 0.06], fill=(50, 70, 90))
    draw.polygon([(cx, cy), (cx - fw * 0.1, cy + fh * 0.28), (cx + fw * 0.1, cy + fh * 0.28)],
                 fill=(205, 160, 130))
    draw.chord([cx - fw * 0.35, cy + fh * 0.38, cx + fw * 0.35, cy + fh * 0.62], 0, 180, fill=(150, 60, 60))
    opening = min(max(float(mouth_opening), 0.0), 1.0)
    if opening > 0.02:  # lips part around a dark interior, the jaw drops with it
        half_h = fh * 0.13 * opening
        draw.ellipse([cx - fw * 0.3, cy + fh * 0.5 - half_h - fh * 0.03, cx + fw * 0.3, cy + fh * 0.5 + half_h + fh * 0.05],
                     fill=(150, 60, 60))
        draw.ellipse([cx - fw * 0.24, cy + fh * 0.5 - half_h, cx + fw * 0.24, cy + fh * 0.5 + half_h + fh * 0.02],
                     fill=(40, 12, 16))
    return np.asarray(image, dtype=np.uint8).copy()


def drawn_mouth_box(height: int, width: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end exclusive, that holds the drawn face's mouth at any opening."""
    cx, cy, fw, fh = width / 2, height * 0.48, width * 0.30, height * 0.38
    return (int(cx - fw * 0.45), int(cy + fh * 0.3), int(np.ceil(cx + fw * 0.45)), int(np.ceil(cy + fh * 0.72)))


def resize_rgb(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center-crop to the target aspect ratio, then resize (what the idle frames show)."""
    h, w = image.shape[:2]
    target = width / height
    if w / h > target:
        new_w = round(h * target)
        left = (w - new_w) // 2
        image = image[:, left:left + new_w]
    else:
        new_h = round(w / target)
        top = (h - new_h) // 2
        image = image[top:top + new_h]
    pil = Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(pil, dtype=np.uint8).copy()
