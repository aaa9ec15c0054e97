"""One-pass Triton kernels for the float8 KV cache's packing and widening (`model/net/kv_quant.py`).

Why: in eager PyTorch the packing is ~10 elementwise passes over float32 temporaries and the widening two
strided passes, about 1.5 ms per layer and call at 704x384 (one H200, 2026-12-02: the per-step scheme went
from 3.8 to 4.8 s per clip with a float8 cache). Each kernel here reads its input once and writes its output
once: a row is one (token, head) of `head_dim` values, packed as `head_dim` float8 e4m3 bytes then the
bf16 power-of-two scale's two bytes (little-endian), exactly as the eager code lays them out.

Bits equal the eager path's: the scale comes from the float32 exponent field of amax / 448 (frexp's
exponent, so the same power of two), x / scale is exact, and the conversion to e4m3 rounds to nearest even
in both. `kv_quant` still checks that on the first call on each device and falls back to eager otherwise.
Runs on CUDA, and on the CPU under `TRITON_INTERPRET=1` (how the tests check it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ROWS_PER_PROGRAM = 16  # rows (token, head) per program on a GPU
ROWS_PER_PROGRAM_INTERPRETED = 2048  # the CPU interpreter runs programs one by one: few large ones


@triton.jit
def _e4m3_bits(y):
    """float32 y (|y| <= 448) -> its float8 e4m3fn byte, rounded to nearest even, as torch's cast does.

    Integer arithmetic on y's bits rather than the backend's conversion, so the interpreter (whose float8
    cast does not round this way) and the GPU give the same bytes."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 0x80
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    # normal e4m3 (|y| >= 2^-6): keep 3 of the 23 mantissa bits, round the other 20 to nearest even
    top = m >> 20
    rest = m & 0xFFFFF
    up = (rest > 0x80000) | ((rest == 0x80000) & ((top & 1) == 1))
    normal = ((e - 120) << 3) + top + up.to(tl.int32)  # a carry out of the mantissa bumps the exponent
    # subnormal e4m3 (|y| < 2^-6): the count of 2^-9 steps, rounded to nearest even (8 steps = 2^-6)
    full = tl.where(e > 0, m | 0x800000, m)
    shift = tl.minimum(141 - e, 31)
    count = full >> shift
    remainder = full & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    up_sub = (remainder > half) | ((remainder == half) & ((count & 1) == 1))
    small = count + up_sub.to(tl.int32)
    return (sign | tl.where(e >= 121, normal, small)).to(tl.uint8)


@triton.jit
def _pack_kernel(x_ptr, out_ptr, n_rows, D: tl.constexpr, ROW_BYTES: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    live = rows < n_rows
    x = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=live[:, None], other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=1), 7.888609052210118e-31)  # 2^-100, as kv_quant._MIN_AMAX
    ratio_bits = tl.math.div_rn(amax, 448.0).to(tl.int32, bitcast=True)  # rounded as torch divides
    exponent = (ratio_bits >> 23) & 0xFF  # amax / 448 = 1.m * 2^(e - 127) = 0.5 * 1.m * 2^(e - 126)
    scale = ((exponent + 1) << 23).to(tl.float32, bitcast=True)  # 2^(e - 126): frexp's power of two
    inverse = ((253 - exponent) << 23).to(tl.float32, bitcast=True)  # 2^(126 - e): x * inverse == x / scale
    q = _e4m3_bits(tl.minimum(tl.maximum(x * inverse[:, None], -448.0), 448.0))
    tl.store(out_ptr + rows[:, None] * ROW_BYTES + cols[None, :], q, mask=live[:, None])
    scale_bits = (scale.to(tl.int32, bitcast=True) >> 16) & 0xFFFF  # the bf16 of a power of two: its top half
    tl.store(out_ptr + rows * ROW_BYTES + D, (scale_bits & 0xFF).to(tl.uint8), mask=live)
    tl.store(out_ptr + rows * ROW_BYTES + D + 1, (scale_bits >> 8).to(tl.uint8), mask=live)


@triton.jit
def _unpack_kernel(src_ptr, out_ptr, n_rows, D: tl.constexpr, ROW_BYTES: tl.constexpr, ROWS: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, D)
    live = rows < n_rows
    bits = tl.load(src_ptr + rows[:, None] * ROW_BYTES + cols[None, :], mask=live[:, None], other=0)
    values = bits.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    low = tl.load(src_ptr + rows * ROW_BYTES + D, mask=live, other=0).to(tl.int32)
    high = tl.load(src_ptr + rows * ROW_BYTES + D + 1, mask=live, other=0).to(tl.int32)
    scale = ((high << 24) | (low << 16)).to(tl.float32, bitcast=True)
    out = (values * scale[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out, mask=live[:, None])


def _rows_per_program(device: torch.device) -> int:
    return ROWS_PER_PROGRAM if device.type == "cuda" else ROWS_PER_PROGRAM_INTERPRETED


def fits(packed: torch.Tensor, values: torch.Tensor | None = None) -> bool:
    """Whether the kernels take these tensors: contiguous rows, a power-of-two head_dim (Triton's block)."""
    d = packed.shape[-1] - 2
    ok = packed.is_contiguous() and d >= 16 and d & (d - 1) == 0
    return ok and (values is None or values.is_contiguous())


def pack_into(dst: torch.Tensor, x: torch.Tensor) -> None:
    """`kv_quant.pack_into` in one pass: x [..., D] (contiguous) into the contiguous packed slice dst."""
    d = x.shape[-1]
    n_rows = x.numel() // d
    if n_rows:
        rows = _rows_per_program(x.device)
        _pack_kernel[(triton.cdiv(n_rows, rows),)](x, dst, n_rows, D=d, ROW_BYTES=d + 2, ROWS=rows)


def unpack(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`kv_quant.unpack` in one pass: the contiguous packed slice src widened to a new [..., D] of `dtype`."""
    d = src.shape[-1] - 2
    out = torch.empty((*src.shape[:-1], d), dtype=dtype, device=src.device)
    n_rows = out.numel() // d
    if n_rows:
        rows = _rows_per_program(src.device)
        _unpack_kernel[(triton.cdiv(n_rows, rows),)](src, out, n_rows, D=d, ROW_BYTES=d + 2, ROWS=rows)
    return out
