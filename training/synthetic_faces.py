"""Procedurally drawn talking faces: identities, head sway, blinks and a mouth posed per frame.

Drawn with PIL at twice the output size and downsampled, so sub-pixel sway and small mouths stay smooth.
Geometry is in fractions of the image side, so any square size draws the same face.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

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
    # Where the head sits and how large (the classic faces: centred, 1.0), and what surrounds it.
    center_x: float = 0.5
    center_y: float = 0.5
    scale: float = 1.0
    glasses: tuple[int, int, int] | None = None
    light_angle: float = 0.0  # direction the light comes from (radians) ...
    light_strength: float = 0.0  # ... and how much brighter that side is than the other (0: even light)
    grain: float = 0.0  # photographic noise, fixed per identity (std in grey levels)
    # Backdrop drawn behind the person: None = the flat `background` colour; else uint8 [S, S, 3] at any size.
    backdrop: np.ndarray | None = field(default=None, compare=False, repr=False)

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


BACKDROP_KINDS = ("flat", "gradient", "noise", "bokeh", "stripes", "photo")
_BACKDROP_SIDE = 96  # backdrops are drawn small and scaled with the frame (they are out of focus anyway)


def sample_varied_identity(seed: int, name: str | None = None, photos: np.ndarray | None = None) -> Identity:
    """A person drawn anywhere in the frame at any size, with glasses or not, lit from a side, in front of a
    gradient, a noise field, out-of-focus lights, stripes or (with `photos`, uint8 [N, S, S, 3]) a photograph."""
    base = sample_identity(seed, name)
    rng = np.random.default_rng([seed, 31337])
    scale = float(rng.uniform(0.72, 1.12))
    room = max(0.0, (1.0 - scale) * 0.5)  # how far the head may move before the face leaves the frame
    skin = tuple(int(np.clip(c * rng.uniform(0.9, 1.1) + rng.normal(0, 6), 0, 255)) for c in base.skin)
    kinds = BACKDROP_KINDS if photos is not None and len(photos) else BACKDROP_KINDS[:-1]
    kind = str(rng.choice(kinds))
    glasses = tuple(int(v) for v in rng.integers(0, 200, size=3)) if rng.random() < 0.3 else None
    return replace(
        base, skin=skin,  # type: ignore[arg-type]
        center_x=float(0.5 + rng.uniform(-1, 1) * min(room, 0.1) + rng.uniform(-0.03, 0.03)),
        center_y=float(0.5 + rng.uniform(-1, 1) * min(room, 0.08) + rng.uniform(-0.02, 0.04)),
        scale=scale, glasses=glasses,  # type: ignore[arg-type]
        light_angle=float(rng.uniform(0, 2 * np.pi)),
        light_strength=float(rng.uniform(0.0, 0.45)) if rng.random() < 0.7 else 0.0,
        grain=float(rng.uniform(1.0, 5.0)) if rng.random() < 0.5 else 0.0,
        backdrop=None if kind == "flat" else render_backdrop(kind, rng, photos))


def render_backdrop(kind: str, rng: np.random.Generator, photos: np.ndarray | None = None,
                    side: int = _BACKDROP_SIDE) -> np.ndarray:
    """A uint8 [side, side, 3] backdrop of one of BACKDROP_KINDS (not "flat"), drawn from `rng`."""
    c0, c1 = (rng.integers(20, 236, size=3).astype(np.float32) for _ in range(2))
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / (side - 1)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = np.clip(0.5 + (x - 0.5) * np.cos(angle) + (y - 0.5) * np.sin(angle), 0, 1)[..., None]
        out = c0 * (1 - t) + c1 * t
    elif kind == "noise":  # value noise over a few octaves, coloured between two tones
        field_ = np.zeros((side, side), np.float32)
        for octave, weight in ((4, 0.5), (8, 0.3), (16, 0.2)):
            grid = Image.fromarray(rng.random((octave, octave)).astype(np.float32), mode="F")
            field_ += weight * np.asarray(grid.resize((side, side), Image.Resampling.BICUBIC))
        t = np.clip((field_ - field_.min()) / max(float(np.ptp(field_)), 1e-6), 0, 1)[..., None]
        out = c0 * (1 - t) + c1 * t
    elif kind == "bokeh":  # out-of-focus lights on a dim gradient
        image = Image.fromarray((c0[None, None] * (0.4 + 0.6 * y[..., None])).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(6, 18))):
            cx, cy, r = rng.uniform(0, side), rng.uniform(0, side), rng.uniform(3, side / 6)
            colour = tuple(int(v) for v in rng.integers(80, 256, size=3))
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
        from PIL import ImageFilter

        out = np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(1.5, 4.0))), np.float32)
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        t = (0.5 + 0.5 * np.sin(2 * np.pi * ((x * np.cos(angle) + y * np.sin(angle)) * side) / period))[..., None]
        out = c0 * (1 - t) + c1 * t
    elif kind == "photo":
        if photos is None or not len(photos):
            raise ValueError("a photo backdrop needs a photo bank")
        out = random_crop(photos[int(rng.integers(len(photos)))], rng, side).astype(np.float32)
    else:
        raise ValueError(f"unknown backdrop kind {kind!r}; use one of {BACKDROP_KINDS[1:]}")
    return np.clip(out, 0, 255).astype(np.uint8)


def random_crop(photo: np.ndarray, rng: np.random.Generator, side: int) -> np.ndarray:
    """A random square crop of 40-100% of the photo's shorter side, resized to `side`, maybe mirrored."""
    h, w = photo.shape[:2]
    crop = int(min(h, w) * rng.uniform(0.4, 1.0))
    top, left = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
    out = Image.fromarray(photo[top:top + crop, left:left + crop]).resize((side, side), Image.Resampling.LANCZOS)
    out = np.asarray(out, np.uint8)
    return out[:, ::-1].copy() if rng.random() < 0.5 else out


def mouth_box(identity: Identity, size: int) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), end exclusive, that holds the mouth in every pose of this identity."""
    k = identity.scale
    half_w = (identity.mouth_half_width + _SWAY_MAX + _MOUTH_MARGIN) * k
    half_h = (_MOUTH_OPEN_MAX + 0.012 + _SWAY_MAX + _MOUTH_MARGIN) * k
    cx, cy = identity.center_x, identity.center_y + (identity.mouth_y - 0.5) * k
    x0, x1 = max(0.0, cx - half_w), min(1.0, cx + half_w)
    y0, y1 = max(0.0, cy - half_h), min(1.0, cy + half_h)
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
    if identity.backdrop is None:
        image = Image.new("RGB", (side, side), identity.background)
    else:
        image = Image.fromarray(identity.backdrop).resize((side, side), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    k, head_x, head_y = identity.scale, identity.center_x, identity.center_y

    def box(cx: float, cy: float, half_w: float, half_h: float, moves: bool = True) -> list[float]:
        ox, oy = (pose.dx, pose.dy) if moves else (0.0, 0.0)
        x, y = head_x + (cx - 0.5 + ox) * k, head_y + (cy - 0.5 + oy) * k
        return [(x - half_w * k) * side, (y - half_h * k) * side, (x + half_w * k) * side, (y + half_h * k) * side]

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
    if identity.glasses is not None:
        rim = max(2, int(side * 0.008 * k))
        for side_sign in (-1, 1):
            ex = 0.5 + side_sign * identity.eye_spacing
            draw.ellipse(box(ex, eye_y, 0.05, 0.038), outline=identity.glasses, width=rim)
        bridge = box(0.5, eye_y, identity.eye_spacing - 0.05, 0.0)
        draw.line(bridge, fill=identity.glasses, width=rim)

    _draw_mouth(draw, identity, pose, box)
    small = np.asarray(image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    if identity.light_strength or identity.grain:
        small = small * _light_field(identity, size)[..., None] + _grain_field(identity, size)
    return np.clip(small + 0.5, 0, 255).astype(np.uint8)


def _light_field(identity: Identity, size: int) -> np.ndarray:
    """A smooth brightness ramp across the frame (a key light from one side), 1 on average."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1) - 0.5
    ramp = x * np.cos(identity.light_angle) + y * np.sin(identity.light_angle)
    return 1.0 + identity.light_strength * ramp


def _grain_field(identity: Identity, size: int) -> np.ndarray:
    """Film/sensor grain fixed by the identity (the reference and every frame share it, as a photo would)."""
    if not identity.grain:
        return np.zeros((size, size, 1), np.float32)
    rng = np.random.default_rng([zlib.crc32(identity.name.encode()), size, 77])
    return rng.normal(0.0, identity.grain, size=(size, size, 3)).astype(np.float32)


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
