"""Photographs for training: the sample photos scikit-image ships inside its wheel, read straight from the zip.

    python -m training.photos --out artifacts/device_in/photos.npz   # once, on a machine with pip and network

The wheel is fetched with pip (no install: scikit-image needs scipy and more, and only its files are used).
The astronaut portrait (NASA, public domain) is held out: it is the photograph the acceptance animates
(`evaluation/assets/astronaut_128.png`), so training never sees it.
"""
from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

WHEEL = "scikit-image==0.26.0"
TRAIN_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "brick.png", "grass.png",
                "gravel.png", "hubble_deep_field.jpg", "ihc.png", "color.png", "retina.jpg", "camera.png",
                "moon.png", "coins.png", "page.png", "text.png", "clock_motion.png", "logo.png")
HELDOUT_PHOTO = "astronaut.png"
PHOTO_SIDE = 256


def fetch_wheel(directory: Path) -> Path:
    """scikit-image's wheel for this platform, downloaded by pip into `directory` (nothing installed)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--dest", str(directory), WHEEL], check=True)
    wheels = sorted(directory.glob("scikit_image-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL} left no wheel in {directory}")
    return wheels[0]


def read_photo(wheel: Path, name: str, side: int = PHOTO_SIDE) -> np.ndarray:
    """One of the wheel's sample images as uint8 RGB, its shorter side scaled to `side` (centre crop square)."""
    with zipfile.ZipFile(wheel) as archive:
        image = Image.open(io.BytesIO(archive.read(f"skimage/data/{name}"))).convert("RGB")
    short = min(image.size)
    left, top = (image.width - short) // 2, (image.height - short) // 2
    square = image.crop((left, top, left + short, top + short)).resize((side, side), Image.Resampling.LANCZOS)
    return np.asarray(square, np.uint8)


def save_photo_bank(out: Path, wheel: Path | None = None) -> Path:
    """All TRAIN_PHOTOS as one uint8 [N, 256, 256, 3] array in `out` (npz)."""
    with tempfile.TemporaryDirectory() as tmp:
        wheel = wheel or fetch_wheel(Path(tmp))
        photos = np.stack([read_photo(wheel, name) for name in TRAIN_PHOTOS])
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, photos=photos, names=np.array(TRAIN_PHOTOS))
    return out


def load_photo_bank(path: str | Path | None) -> np.ndarray | None:
    """uint8 [N, S, S, 3] from `save_photo_bank`, or None without a path (training then uses drawn backdrops only)."""
    if path is None or not Path(path).exists():
        return None
    with np.load(path) as bank:
        return bank["photos"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Save the training photographs (scikit-image's sample photos).")
    p.add_argument("--out", default="artifacts/device_in/photos.npz")
    p.add_argument("--wheel", default=None, help="a scikit-image wheel already downloaded")
    args = p.parse_args(argv)
    path = save_photo_bank(Path(args.out), Path(args.wheel) if args.wheel else None)
    print(f"{path}: {len(TRAIN_PHOTOS)} photos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
