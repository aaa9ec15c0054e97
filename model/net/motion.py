"""FramePack motion tokens: the latest 19 latent frames packed at three rates (1 + 2 + 16 frames).

Mirrors Wan2.2 `wan/modules/s2v/motioner.py` FramePackMotioner (zip_frame_buckets [1, 2, 16],
drop_mode 'padd', add_last_motion 2): the newest frame at full token rate, the two before it at 1/4,
the sixteen before those at 1/64, so a long past costs few tokens. Module names are the checkpoint's
(`frame_packer.proj*`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from model.net.rope import grid_positions

ZIP_FRAME_BUCKETS = (1, 2, 16)  # newest .. oldest, in latent frames
MOTION_LATENT_FRAMES = sum(ZIP_FRAME_BUCKETS)  # 19 = (73 motion video frames + 3) // 4


class FramePackMotioner(nn.Module):
    """motion latents [B, 16, T, h, w] -> tokens [B, N, dim] and their RoPE positions [N, 3]."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=(1, 2, 2), stride=(1, 2, 2))
        self.proj_2x = nn.Conv3d(in_channels, dim, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.proj_4x = nn.Conv3d(in_channels, dim, kernel_size=(4, 8, 8), stride=(4, 8, 8))

    def forward(self, motion: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = motion.shape
        packed = motion.new_zeros(b, c, MOTION_LATENT_FRAMES, h, w)  # older than the stream: zeros ('padd')
        keep = min(t, MOTION_LATENT_FRAMES)
        if keep:
            packed[:, :, -keep:] = motion[:, :, -keep:]
        n4, n2, n1 = ZIP_FRAME_BUCKETS[::-1]
        oldest, middle, newest = packed.split([n4, n2, n1], dim=2)
        tokens = [self.proj(newest), self.proj_2x(middle), self.proj_4x(oldest)]
        return torch.cat([t_.flatten(2).transpose(1, 2) for t_ in tokens], dim=1)

    @staticmethod
    def positions(latent_h: int, latent_w: int) -> torch.Tensor:
        """RoPE positions of the packed tokens, frames relative to the first frame after the motion.

        As Wan2.2 `rope_precompute` with the FramePack grid sizes: newest frame at -1, the 2x bucket at -3,
        the 4x bucket at -19, -14, -9, -4; rows/cols spread over the full-rate grid (linspace, truncated).
        """
        hp, wp = latent_h // 2, latent_w // 2

        def spread(n_tokens: int, extent: int) -> list[int]:
            return np.linspace(0, extent - 1, n_tokens).astype(int).tolist()

        n1, n2, n4 = ZIP_FRAME_BUCKETS
        newest = grid_positions([-n1], spread(hp, hp), spread(wp, wp))
        middle = grid_positions([-(n1 + n2)], spread(latent_h // 4, hp), spread(latent_w // 4, wp))
        oldest_frames = (-np.linspace(n1 + n2 + n4, n4 // 4, n4 // 4).astype(int)).tolist()
        oldest = grid_positions(oldest_frames, spread(latent_h // 8, hp), spread(latent_w // 8, wp))
        return torch.cat([newest, middle, oldest], dim=0)
