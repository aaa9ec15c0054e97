"""3D rotary position embedding of Wan2.x, for arbitrary (also negative) token positions.

Same math as Wan's `rope_params`/`rope_apply` and diffusers' `WanRotaryPosEmbed`: the head dim is split
into time/height/width parts (head_dim - 4*(head_dim//6), 2*(head_dim//6), 2*(head_dim//6)), each
rotated by position * theta^(-2i/d) on adjacent channel pairs. Tables here are computed from positions
rather than looked up: the streaming DiT rotates every token at its absolute latent frame (the block's,
each cached block's once when it is written, the sink's once per block), so streams of hours reach
frame indices near 10^6. Angles are float64 (on the positions' device), tables float32: exact enough
there (the float32 cast, ~6e-8, dominates), and only differences of positions reach attention.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    """cos, sin [S, head_dim // 2] (float32) for positions [S, 3] (frame, row, col); float64 angles.

    Computed where `positions` live (no host round trip for device positions), then moved to `device`.
    """
    positions = positions.to(torch.float64)
    angles = []
    for axis, dim in enumerate(rope_split(head_dim)):
        steps = torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)
        inv_freq = 1.0 / theta ** (steps / dim)
        angles.append(positions[:, axis : axis + 1] * inv_freq[None, :])
    angle = torch.cat(angles, dim=1)
    return angle.cos().float().to(device), angle.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, S, H, D] by the tables [S, D/2]; float32 math, x's dtype out.

    The plain form of the math (kept for reading and for tools); the DiT uses `rotate`/`rotate_into`.
    """
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


# ----------------------------------------------------------------------------- rotation on the hot path


@dataclass(frozen=True)
class RotationTables:
    """RoPE tables laid out for an element-wise rotation of x [B, S, H, D]: both [S, 1, D] float32.

    `cos` holds each pair's cosine twice, `sin` the pair's sine as (-sin, +sin), so the rotation is
    x * cos + swap_pairs(x) * sin: one pass over x, no stacking, and a chain torch.compile fuses whole.
    """

    cos: torch.Tensor
    sin: torch.Tensor

    @property
    def length(self) -> int:
        return self.cos.shape[0]


def rotation_tables(
    positions: torch.Tensor,
    head_dim: int,
    device: torch.device | str | None = None,
    theta: float = ROPE_THETA,
) -> RotationTables:
    """`RotationTables` for positions [S, 3]; float64 angles where the positions are, float32 tables on `device`."""
    cos, sin = rope_tables(positions, head_dim, None, theta)
    cos2 = cos.repeat_interleave(2, dim=-1)
    sin2 = torch.stack((-sin, sin), dim=-1).flatten(-2)
    return RotationTables(cos2[:, None].to(device), sin2[:, None].to(device))


def _swap_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) along the last dim."""
    return x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


def eager_fast_path() -> bool:
    """Out-of-place kernels with `out=` save passes in eager inference; compiled or autograd code keeps it functional."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """RoPE of x [B, S, H, D] by `RotationTables` cos/sin [S, 1, D]: float32 math, `dtype` (default x's) out."""
    dtype = dtype or x.dtype
    if eager_fast_path():
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        _rotate_into(out, x, cos, sin)
        return out
    xf = x.float()
    return (xf * cos + _swap_pairs(xf) * sin).to(dtype)


def rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """RoPE of x [B, S, H, D] written into `out` (same shape, any float dtype; e.g. a KV cache slice).

    Eager inference only (no autograd, not under torch.compile): float32 math inside the kernels,
    one rounding into `out`, no temporary of x's size in x's dtype.
    """
    _rotate_into(out, x, cos, sin)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    # x * cos promotes to float32 inside the kernel (no separate cast pass); addcmul adds swap(x) * sin in
    # float32 and rounds once into `out`: three passes over x instead of the seven of cast/unflatten/stack.
    torch.addcmul(x * cos, _swap_pairs(x), sin, out=out)
