"""Detail restore: the model's motion shown on the sharp reference image instead of on its blurred drawing.

Why: a small VAE cannot draw a face or a photograph it was not trained on (the tiny model's decode of a
128x128 photograph is coloured blobs; of a face, ~19 dB outside the mouth even on faces like its training
set), and the DiT adds its own steady errors (a dark blob where it expects a mouth). What it does draw well
is *change*: the mouth opening and closing with the words. So each generated frame is split into a slow
baseline, what the model keeps drawing, and the change from that baseline, and the viewer sees the
reference plus the change:

    out_t = reference + luma(frame_t - baseline_t)

Wherever the model holds still, the viewer sees the reference image itself (sharp, its own colours); where
it moves something, that movement is added on top as a change of brightness (Rec. 601 luma, the same on all
three channels: the tiny model's changes of hue around the mouth are its errors, green or pink casts, while
the opening itself is a darkening; measured: 31.7 against 30.2 dB, same lip sync, no colour casts).

The baseline follows each pixel's upper envelope: it
rises to a brighter frame within `rise_s` and falls to a darker one over `settle_s`, because an opening
mouth darkens the frame, so a closed mouth (the bright state) is the baseline and an open one a darkening
added to the reference's closed mouth, while a steady error of the model sinks into the baseline and is
not shown. The baseline starts at the stream's first frame.

Steady exposure (`video.detail_steady_exposure`): the frame-wide part of a change (each channel's median change
over the frame: the mouth is a small part of it) is neither shown nor followed by the baseline. What moves the
whole frame at once is the model's error, not the talking: a decoder that swaps its cache every few clips
(`model.vae.stream_context_frames`) draws the first frames after a swap a little brighter, and an upper-envelope
baseline rises to each such flash within `rise_s` but sinks back only over `settle_s`, so without this the
viewer's face sits a flash's brightness below the reference.

This is this project's option (`video.detail_restore`), on in the tiny preset and off in the 14B preset
(the reference's path): a model that turns the head would leave a faint copy of the still reference under
the moved head. Cost: a handful of elementwise passes per frame.
"""
from __future__ import annotations

import math

import torch

from model.config import VideoConfig

LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights of R, G, B in a change of brightness


class DetailRestore:
    """Per session: the reference [1, 3, H, W] in [-1, 1] and the running baseline of the frames drawn so far."""

    def __init__(self, reference: torch.Tensor, fps: float, settle_s: float, rise_s: float,
                 steady_exposure: bool = False) -> None:
        if reference.ndim != 4 or reference.shape[:2] != (1, 3):
            raise ValueError(f"reference must be [1, 3, H, W], got {tuple(reference.shape)}")
        if settle_s <= 0 or rise_s <= 0:
            raise ValueError(f"--video.detail_settle_s and --video.detail_rise_s must be > 0, got {settle_s}, {rise_s}")
        self.reference = reference[0].float()  # [3, H, W]
        self.fall = 1.0 - math.exp(-1.0 / (settle_s * fps))  # per-frame step toward a darker frame
        self.rise = 1.0 - math.exp(-1.0 / (rise_s * fps))  # per-frame step toward a brighter frame
        self.steady_exposure = steady_exposure  # drop each frame's frame-wide change (see the module docstring)
        self.baseline: torch.Tensor | None = None  # [3, H, W]
        self.luma = torch.tensor(LUMA, dtype=torch.float32, device=reference.device).view(3, 1, 1)

    @classmethod
    def from_config(cls, reference: torch.Tensor, video: VideoConfig) -> DetailRestore:
        """The restore as `video.detail_*` configures it (the server's sessions and the offline judges alike)."""
        return cls(reference, video.fps, video.detail_settle_s, video.detail_rise_s, video.detail_steady_exposure)

    def apply(self, video: torch.Tensor) -> torch.Tensor:
        """Decoded video [1, 3, T, H, W] in [-1, 1] -> the reference plus each frame's change from the baseline."""
        frames = video[0].float().transpose(0, 1)  # [T, 3, H, W]
        if self.baseline is None:
            self.baseline = frames[0].clone()  # the first frame (any split of the stream into calls: same frames)
        out = torch.empty_like(frames)
        baseline = self.baseline
        for t, frame in enumerate(frames):
            change = frame - baseline
            if self.steady_exposure:
                change = change - change.flatten(1).median(dim=1).values.view(3, 1, 1)
            out[t] = self.reference + (change * self.luma).sum(dim=0, keepdim=True)
            step = torch.where(change > 0, self.rise, self.fall)
            baseline = baseline + step * change
        self.baseline = baseline
        return out.clamp_(-1.0, 1.0).transpose(0, 1)[None].to(video.dtype)
