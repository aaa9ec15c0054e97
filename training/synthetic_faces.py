"""Procedurally drawn talking faces: identities, head sway, blinks and a mouth posed per frame.

Drawn with PIL at twice the output size and downsampled, so sub-pixel sway and small mouths stay smooth.
Geometry is in fractions of the image side, so any square size draws the same face.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from training.mouth_motion import MouthTrack

_SUPERSAMPLE = 2
# Head sway amplitude (fraction of the side); the mouth box leaves room for it.
_SWAY_MAX = 0.018
_MOUTH_OPEN_MAX = 0.06  # half-height of the open mouth's dark interior
_MOUTH_MARGIN = 0.02

SKIN_TONES: tuple[tuple[int, int, int], ...] = (
    (255, 224, 196), (241, 194, 160), (226, 172, 130), (200, 140, 100),
    (168, 108, 72), (130, 84, 56), (100, 66, 48),
)
HAIR_COLOURS: tuple[tuple[int, int, int], ...] = (
    (28, 24, 24), (66, 44, 30), (118, 78, 44), (214, 184, 118), (164, 70, 36), (168, 168, 172), (46, 62, 138),
)
EYE_COLOURS: tuple[tuple[int, int, int], ...] = (
    (92, 58, 30), (60, 110, 170), (70, 130, 80), (130, 100, 50), (110, 120, 130),
)
HAIR_STYLES: tuple[str, ...] = ("short", "long", "bob", "bald", "bun")
_MOUTH_INTERIOR = (26, 8, 12)


@dataclass(frozen=True)
class Identity:
    """Everything that makes one synthetic person look like themself."""

    name: str
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    hair_style: str
    eyes: tuple[int, int, int]
    background: tuple[int, int, int]
    clothes: tuple[int, int, int]
    head_half_width: float
    head_half_height: float
    eye_spacing: float
    mouth_y: float
    mouth_half_width: float

    @property
    def lips(self) -> tuple[int, int, int]:
        r, g, b = self.skin
        return (int(r * 0.82 + 18), int(g * 0.62), int(b * 0.62))


@dataclass(frozen=True)
class FacePose:
    """One frame's pose: head offset (fraction of side), blink 0 open .. 1 shut, mouth opening and spread."""

    dx: float = 0.0
    dy: float = 0.0
    blink: float = 0.0
    opening: float = 0.0
    spread: float = 0.5


@dataclass(frozen=True)
class HeadMotion:
    """Per frame head offsets and eyelid closure, independent of the voice."""

    dx: np.ndarray  # float32 [T]
    dy: np.ndarray  # float32 [T]
    blink: np.ndarray  # float32 [T]


def sample_identity(seed: int, name: str | None = None) -> Identity:
    """A random person, fixed by `seed`."""
    rng = np.random.default_rng([seed, 7919])
    background = tuple(int(v) for v in rng.integers(40, 225, size=3))
    clothes = tuple(int(v) for v in rng.integers(20, 235, size=3))
    return Identity(
        name=name or f"identity-{seed}",
        skin=SKIN_TONES[int(rng.integers(len(SKIN_TONES)))],
        hair=HAIR_COLOURS[int(rng.integers(len(HAIR_COLOURS)))],
        hair_style=HAIR_STYLES[int(rng.integers(len(HAIR_STYLES)))],
        eyes=EYE_COLOURS[int(rng.integers(len(EYE_COLOURS)))],
        background=background,  # type: ignore[arg-type]
        clothes=clothes,  # type: ignore[arg-type]
        head_half_width=float(rng.uniform(0.24, 0.29)),
        head_half_height=float(rng.uniform(0.30, 0.34)),
        eye_spacing=float(rng.uniform(0.095, 0.12)),
        mouth_y=float(rng.uniform(0.625, 0.645)),
        mouth_half_width=float(rng.uniform(0.085, 0.105)),
    )


def mouth_box(identity: Identity, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end exclusive, that holds the mouth in every pose of this identity."""
    half_w = identity.mouth_half_width + _SWAY_MAX + _MOUTH_MARGIN
    half_h = _MOUTH_OPEN_MAX + 0.012 + _SWAY_MAX + _MOUTH_MARGIN
    x0, x1 = 0.5 - half_w, 0.5 + half_w
    y0, y1 = identity.mouth_y - half_h, identity.mouth_y + half_h
    return (int(np.floor(x0 * size)), int(np.floor(y0 * size)), int(np.ceil(x1 * size)), int(np.ceil(y1 * size)))


def head_motion(seed: int, num_frames: int, fps: float) -> HeadMotion:
    """Slow sway from two sinusoids per axis and a blink every 2-5 s, fixed by `seed`."""
    rng = np.random.default_rng([seed, 104729])
    t_s = np.arange(num_frames) / fps
    offsets = []
    for _ in range(2):
        periods_s = rng.uniform(2.5, 7.0, size=2)
        phases = rng.uniform(0, 2 * np.pi, size=2)
        weights = rng.uniform(0.3, 0.5, size=2)
        wave = sum(w * np.sin(2 * np.pi * t_s / p + ph) for w, p, ph in zip(weights, periods_s, phases))
        offsets.append(_SWAY_MAX * wave)
    blink = np.zeros(num_frames, np.float32)
    next_blink_s = rng.uniform(0.5, 3.0)
    profile = np.array([0.6, 1.0, 0.5])  # close fast, open a little slower
    while next_blink_s < t_s[-1] if num_frames else False:
        start = int(next_blink_s * fps)
        for k, value in enumerate(profile):
            if start + k < num_frames:
                blink[start + k] = value
        next_blink_s += rng.uniform(2.0, 5.0)
    return HeadMotion(dx=offsets[0].astype(np.float32), dy=offsets[1].astype(np.float32), blink=blink)


def still_motion(num_frames: int) -> HeadMotion:
    """No sway, no blinks: for reference images and metric calibration."""
    zeros = np.zeros(num_frames, np.float32)
    return HeadMotion(dx=zeros, dy=zeros, blink=zeros)


def render_frame(identity: Identity, pose: FacePose, size: int) -> np.ndarray:
    """One uint8 [size, size, 3] frame of `identity` in `pose`."""
    side = size * _SUPERSAMPLE
    image = Image.new("RGB", (side, side), identity.background)
    draw = ImageDraw.Draw(image)

    def box(cx: float, cy: float, half_w: float, half_h: float, moves: bool = True) -> list[float]:
        ox, oy = (pose.dx, pose.dy) if moves else (0.0, 0.0)
        return [(cx + ox - half_w) * side, (cy + oy - half_h) * side,
                (cx + ox + half_w) * side, (cy + oy + half_h) * side]

    hw, hh = identity.head_half_width, identity.head_half_height
    # shoulders stay put; the head sways above them
    draw.ellipse(box(0.5, 1.08, 0.46, 0.2, moves=False), fill=identity.clothes)
    draw.rectangle(box(0.5, 0.84, 0.085, 0.08, moves=False), fill=_shade(identity.skin, 0.85))
    if identity.hair_style in ("long", "bob"):
        drop = 0.40 if identity.hair_style == "long" else 0.22
        draw.rounded_rectangle(box(0.5, 0.40 + drop / 2, hw + 0.05, hh * 0.55 + drop / 2),
                               radius=0.08 * side, fill=identity.hair)
    draw.ellipse(box(0.5 - hw, 0.47, 0.03, 0.05), fill=_shade(identity.skin, 0.92))  # ears
    draw.ellipse(box(0.5 + hw, 0.47, 0.03, 0.05), fill=_shade(identity.skin, 0.92))
    draw.ellipse(box(0.5, 0.45, hw, hh), fill=identity.skin)
    if identity.hair_style != "bald":
        draw.chord(box(0.5, 0.36, hw + 0.012, hh * 0.78), start=180, end=360, fill=identity.hair)
    if identity.hair_style == "bun":
        draw.ellipse(box(0.5, 0.09, 0.08, 0.06), fill=identity.hair)

    eye_y = 0.42
    for side_sign in (-1, 1):
        ex = 0.5 + side_sign * identity.eye_spacing
        draw.line(box(ex, eye_y - 0.055, 0.035, 0.0)[:4], fill=_shade(identity.hair, 0.8), width=max(2, side // 80))
        open_h = 0.022 * (1.0 - 0.9 * pose.blink)
        draw.ellipse(box(ex, eye_y, 0.035, open_h), fill=(245, 245, 240))
        if pose.blink < 0.7:
            draw.ellipse(box(ex, eye_y, 0.016, min(0.016, open_h)), fill=identity.eyes)
            draw.ellipse(box(ex, eye_y, 0.007, min(0.007, open_h)), fill=(12, 12, 14))
        if pose.blink > 0.0:
            draw.ellipse(box(ex, eye_y - 0.022 * pose.blink * 0.5, 0.037, 0.022 * pose.blink * 0.6),
                         fill=_shade(identity.skin, 0.9))
    draw.ellipse(box(0.5, 0.49, 0.02, 0.045), fill=_shade(identity.skin, 0.93))  # nose
    draw.ellipse(box(0.5, 0.515, 0.024, 0.01), fill=_shade(identity.skin, 0.8))

    _draw_mouth(draw, identity, pose, box)
    small = image.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def _draw_mouth(draw: ImageDraw.ImageDraw, identity: Identity, pose: FacePose, box) -> None:
    half_w = identity.mouth_half_width * (0.72 + 0.28 * pose.spread)
    open_half_h = _MOUTH_OPEN_MAX * float(np.clip(pose.opening, 0.0, 1.0))
    lip = 0.011
    draw.ellipse(box(0.5, identity.mouth_y, half_w, open_half_h + lip), fill=identity.lips)
    if open_half_h > 0.002:
        draw.ellipse(box(0.5, identity.mouth_y, half_w * 0.82, open_half_h), fill=_MOUTH_INTERIOR)
    else:
        seam = box(0.5, identity.mouth_y, half_w * 0.85, 0.0)
        draw.line(seam, fill=_shade(identity.lips, 0.75), width=1)


def _shade(colour: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(np.clip(c * factor, 0, 255)) for c in colour)  # type: ignore[return-value]


def render_video(identity: Identity, track: MouthTrack, motion: HeadMotion, size: int) -> np.ndarray:
    """uint8 [T, size, size, 3]: the identity speaking along `track` while moving along `motion`."""
    frames = np.empty((len(track), size, size, 3), np.uint8)
    for i in range(len(track)):
        pose = FacePose(dx=float(motion.dx[i]), dy=float(motion.dy[i]), blink=float(motion.blink[i]),
                        opening=float(track.opening[i]), spread=float(track.spread[i]))
        frames[i] = render_frame(identity, pose, size)
    return frames


def reference_image(identity: Identity, size: int) -> np.ndarray:
    """The still, closed-mouth portrait that names the identity to the model."""
    return render_frame(identity, FacePose(), size)
