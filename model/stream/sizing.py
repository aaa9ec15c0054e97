"""A session's frame size and how its reference image is fitted to it (`video.sizing`).

aspect (the reference): `video.size` is an area budget; the frame size follows the image's aspect
ratio in multiples of 64, as LiveAvatar's `get_gen_size` / `get_size_less_than_area`
(liveavatar/models/wan/causal_s2v_pipeline_tpp.py L352-412, L591-603, L750-761): under 704*384 a 16:9
landscape image gives 384x704 (height x width), a portrait one 704x384, a square one 512x512. The image
is then resized so its short side is min(height, width) (bilinear, antialiased: torchvision `Resize` on a
PIL image) and centre-cropped, padded with black where it falls short (torchvision `CenterCrop`).
crop: every session runs at exactly `video.size`; the image is scaled to cover it (Lanczos) and
centre-cropped.

Pure numpy/PIL: the server imports it to size its tracks before the model has seen the image.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image

SIZE_DIVISOR = 64  # the reference pads its sizes to multiples of 64
_SCALE_TRIES = 100  # the reference's scale search: 100 steps from the largest scale down


def aspect_frame_size(image_hw: tuple[int, int], max_area: int) -> tuple[int, int]:
    """(height, width), multiples of 64, for an image of `image_hw` under `max_area` pixels (the reference's rule)."""
    height, width = image_hw
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if height * width <= max_area:
        min_scale, max_scale = 0.1, 1.0
    else:
        d = SIZE_DIVISOR - 1
        a, b, c = height * width, d * (height + width), d * d - max_area
        min_scale = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        max_scale = math.sqrt(max_area / (height * width))
    for i in range(_SCALE_TRIES):
        scale = max_scale - (max_scale - min_scale) * i / _SCALE_TRIES
        padded_h = _round_up(int(height * scale))
        padded_w = _round_up(int(width * scale))
        if padded_h * padded_w <= max_area:
            return padded_h, padded_w
    aspect = width / height  # the reference's fallback: the aspect ratio's own multiples of 64
    target_w = int((max_area * aspect) ** 0.5 // SIZE_DIVISOR * SIZE_DIVISOR)
    target_h = int((max_area / aspect) ** 0.5 // SIZE_DIVISOR * SIZE_DIVISOR)
    if target_w >= width or target_h >= height:
        target_w, target_h = int(width // SIZE_DIVISOR * SIZE_DIVISOR), int(height // SIZE_DIVISOR * SIZE_DIVISOR)
    return target_h, target_w


def _round_up(n: int) -> int:
    return n + (SIZE_DIVISOR - n % SIZE_DIVISOR) % SIZE_DIVISOR


def session_frame_size(sizing: str, size_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """The frame size (height, width) a session with this reference image runs at."""
    if sizing == "crop":
        return size_hw
    if sizing == "aspect":
        frame = aspect_frame_size(image_hw, size_hw[0] * size_hw[1])
        if min(frame) <= 0:
            raise ValueError(f"a {image_hw[0]}x{image_hw[1]} reference image gives no frame of 64-pixel steps under "
                             f"{size_hw[1]}*{size_hw[0]} (--video.size); use a larger image or --video.sizing crop")
        return frame
    raise ValueError(f"--video.sizing must be aspect or crop, got {sizing!r}")


def rgb_image(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] from gray [H, W] or RGBA, or a ValueError saying what came."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise ValueError(f"reference image must be uint8 [H, W, 3] (RGB), got {image.dtype} {list(image.shape)}")
    return np.ascontiguousarray(image[..., :3])


def fit_cover_crop(image: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """Scale the image to cover (height, width) (Lanczos), then crop the centre: uint8 [H, W, 3]."""
    height, width = frame_size
    pil = Image.fromarray(rgb_image(image))
    scale = max(height / pil.height, width / pil.width)
    resized = pil.resize((max(width, math.ceil(pil.width * scale)), max(height, math.ceil(pil.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - width) // 2, (resized.height - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)), dtype=np.uint8)


def fit_short_side_center(image: np.ndarray, frame_size: tuple[int, int]) -> np.ndarray:
    """The reference's fit: short side to min(height, width) (bilinear), centre crop, black padding if short."""
    height, width = frame_size
    pil = Image.fromarray(rgb_image(image))
    short, long = sorted((pil.width, pil.height))
    new_short, new_long = min(height, width), int(min(height, width) * long / short)
    new_w, new_h = (new_short, new_long) if pil.width <= pil.height else (new_long, new_short)
    resized = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR), dtype=np.uint8)
    # torchvision CenterCrop: pad (left/top get the floor half) when short, then crop at round((size - crop) / 2)
    pad_top, pad_left = max(0, (height - new_h) // 2), max(0, (width - new_w) // 2)
    canvas = np.zeros((max(new_h, height), max(new_w, width), 3), np.uint8)
    canvas[pad_top:pad_top + new_h, pad_left:pad_left + new_w] = resized
    top, left = round((canvas.shape[0] - height) / 2.0), round((canvas.shape[1] - width) / 2.0)
    return np.ascontiguousarray(canvas[top:top + height, left:left + width])


def fit_reference_image(image: np.ndarray, frame_size: tuple[int, int], sizing: str = "crop") -> np.ndarray:
    """The reference image as the session's first frame: uint8 [height, width, 3] by `video.sizing`."""
    if sizing == "aspect":
        return fit_short_side_center(image, frame_size)
    return fit_cover_crop(image, frame_size)
