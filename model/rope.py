"""3D rotary position embedding of Wan2.x, for arbitrary (also negative) token positions.

Same math as Wan's `rope_params`/`rope_apply` and diffusers' `WanRotaryPosEmbed`: the head dim is split
into time/height/width parts (head_dim - 4*(head_dim//6), 2*(head_dim//6), 2*(head_dim//6)), each
rotated by position * theta^(-2i/d) on adjacent channel pairs. Tables here are computed from positions
rather than looked up, because the streaming DiT places tokens relative to the block being denoised:
cached blocks sit at negative frames, the reference sink ahead of it, FramePack motion tokens behind.
"""

from __future__ import annotations

import torch

ROPE_THETA = 10000.0


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Channels given to the (frame, height, width) axes; Wan: d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_positions(
    frames: list[float] | torch.Tensor, rows: list[float] | torch.Tensor, cols: list[float] | torch.Tensor
) -> torch.Tensor:
    """Positions [len(frames)*len(rows)*len(cols), 3] in the token order of `x.flatten(2)` of [C, F, H, W]."""
    f, h, w = (torch.as_tensor(a, dtype=torch.float64) for a in (frames, rows, cols))
    grid = torch.stack(torch.meshgrid(f, h, w, indexing="ij"), dim=-1)
    return grid.reshape(-1, 3)


def rope_tables(
    positions: torch.Tensor,
    head_dim: int,
    device: torch.device | str | None = None,
    theta: float = ROPE_THETA,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim // 2] (float32) for positions [S, 3] (frame, row, col)."""
    positions = positions.to(torch.float64)
    angles = []
    for axis, dim in enumerate(rope_split(head_dim)):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, axis : axis + 1] * inv_freq[None, :])
    angle = torch.cat(angles, dim=1)
    return angle.cos().float().to(device), angle.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, S, H, D] by the tables [S, D/2]; float32 math, x's dtype out."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)
