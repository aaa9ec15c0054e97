"""The avatar's video into a virtual camera (pyvirtualcam: v4l2loopback on Linux, OBS Virtual Camera on
Windows and macOS), so call apps list it as a webcam.

A missing device is the usual first-run problem; the error says exactly what to install or run.
"""
from __future__ import annotations

import sys

import numpy as np
from PIL import Image

from client_cam.errors import ClientError

MODPROBE = "sudo modprobe v4l2loopback devices=1 exclusive_caps=1 card_label=LiveAvatar"


WITHOUT_CAMERA = "or record with --out FILE.mp4 instead"  # what the client can do without one


def camera_missing_message(detail: str, device: str | None, instead: str = WITHOUT_CAMERA) -> str:
    """One line: what pyvirtualcam said, and what to run or install so the camera exists."""
    if sys.platform.startswith("linux"):
        where = f" at {device}" if device else ""
        return (f"no virtual camera device{where} ({detail}); create one with: {MODPROBE} "
                f"(Debian/Ubuntu package v4l2loopback-dkms), {instead}")
    return (f"no virtual camera ({detail}); install OBS Studio 28 or newer and press Start Virtual Camera once "
            f"(then Stop it), {instead}")


class VirtualCamera:
    """One open virtual camera of a fixed size and fps; frames of another size are scaled to it."""

    def __init__(self, width: int, height: int, fps: float, device: str | None = None,
                 instead: str = WITHOUT_CAMERA) -> None:
        try:
            import pyvirtualcam
        except ImportError as exc:
            raise ClientError(f"the virtual camera needs pyvirtualcam ({exc}); pip install -r requirements.txt") \
                from None
        try:
            self._camera = pyvirtualcam.Camera(width=width, height=height, fps=fps, device=device,
                                               fmt=pyvirtualcam.PixelFormat.RGB)
        except RuntimeError as exc:
            raise ClientError(camera_missing_message(str(exc).rstrip("."), device, instead)) from None
        self.width, self.height, self.fps = width, height, fps
        self.device = self._camera.device
        self.frames_sent = 0

    def send(self, rgb: np.ndarray) -> None:
        if rgb.shape[:2] != (self.height, self.width):
            rgb = np.asarray(Image.fromarray(rgb).resize((self.width, self.height), Image.BILINEAR))
        self._camera.send(np.ascontiguousarray(rgb))
        self.frames_sent += 1

    def close(self) -> None:
        self._camera.close()


def check_camera(device: str | None, instead: str = WITHOUT_CAMERA) -> None:
    """Fail at start-up, before connecting, when there is no camera to write to (a small test frame size)."""
    VirtualCamera(64, 64, 16.0, device, instead).close()
