"""Float8 storage for the DiT's KV cache (`runtime.kv_cache_dtype float8`): about half the cache's memory.

Why: the reference's per-step scheme keeps one KV window per denoising step; at 704x384 with 40 layers each
window holds ~33k tokens of keys and values per layer, ~13.6 GB in bf16, so four of them decide whether the
14B model fits a GPU at all. In float8 e4m3 with one power-of-two scale per (token, head) they take ~7 GB.

Layout: a packed cache tensor is uint8 [..., head_dim + 2]: the head's `head_dim` float8 e4m3 bits, then its
scale as one bfloat16 (two bytes). Keeping the scale inside the same tensor means every token-range slice
and copy the cache already does (commit into a window slot, copying the sink between windows) moves bits and
scales together, unchanged.

The scale is a power of two (2^ceil(log2(amax / 448))), so widening back is exact in bf16 and float32 (only
the rounding to float8 loses anything: a relative half-step of 2^-4 at most, for entries in e4m3's normal
range) and an eager and a compiled widening give the same bits. Attention widens the slice it reads to the
model's dtype for that call and overwrites the call's own tokens with their unrounded values, so a block
attends to itself exactly as with a bf16 cache; only the sink and the window of earlier blocks are rounded.

On CUDA the packing and widening run as one-pass Triton kernels (`model/net/kv_quant_triton.py`: eager
PyTorch takes ~10 passes for them). The first call of each on a device also runs the eager code and
compares: equal bytes (packing) and values (widening), or that device keeps the eager path, logged once.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
PACKED_DTYPE = torch.uint8
SCALE_DTYPE = torch.bfloat16
SCALE_BYTES = 2
_MIN_AMAX = 2.0 ** -100  # an all-zero head keeps a finite scale (within bf16's exponent range)


def packed_head_dim(head_dim: int) -> int:
    """Bytes per (token, head) of a packed cache: the float8 bits and the bf16 scale."""
    return head_dim + SCALE_BYTES


def is_packed(cache: torch.Tensor) -> bool:
    """Whether a cache tensor holds float8 bits + scales (uint8) rather than values of a float dtype."""
    return cache.dtype == PACKED_DTYPE


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (float8 e4m3 [..., D], bf16 power-of-two scale [..., 1]) with x ~= bits * scale."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_AMAX)
    _, exponent = torch.frexp(amax / FP8_MAX)  # amax / 448 = m * 2^e, m in [0.5, 1): 2^e >= amax / 448
    scale = torch.ldexp(torch.ones_like(amax), exponent)
    bits = (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return bits, scale.to(SCALE_DTYPE)


def pack_into(dst: torch.Tensor, x: torch.Tensor) -> None:
    """Write x [..., D] (any float dtype) into the packed slice dst uint8 [..., D + 2]."""
    d = x.shape[-1]
    if dst.shape[-1] != d + SCALE_BYTES or dst.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"packed cache slice {list(dst.shape)} cannot hold values {list(x.shape)}")
    kernels = _kernels_for("pack", x.device, dst, x)
    if kernels is not None:
        kernels.pack_into(dst, x)
    else:
        _pack_eager(dst, x)


def unpack(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The packed slice src uint8 [..., D + 2] widened to `dtype` [..., D] (exact: the scales are powers of two)."""
    kernels = _kernels_for("unpack", src.device, src, None, dtype)
    return kernels.unpack(src, dtype) if kernels is not None else _unpack_eager(src, dtype)


def _pack_eager(dst: torch.Tensor, x: torch.Tensor) -> None:
    d = x.shape[-1]
    bits, scale = quantize(x)
    dst[..., :d].view(FP8_DTYPE).copy_(bits)
    dst[..., d:].view(SCALE_DTYPE).copy_(scale)


def _unpack_eager(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    d = src.shape[-1] - SCALE_BYTES
    return src[..., :d].view(FP8_DTYPE).to(dtype) * src[..., d:].view(SCALE_DTYPE).to(dtype)


# ----------------------------------------------------------------------------- one-pass kernels where they agree

_agrees: dict[tuple[str, str], bool] = {}  # (pack | unpack, device) -> the kernels gave the eager result there


def fused_kernels_enabled(device: torch.device) -> bool:
    """CUDA with Triton, or the CPU under TRITON_INTERPRET=1 (the tests); LIVEAVATAR_KV_EAGER=1 turns them off."""
    if os.environ.get("LIVEAVATAR_KV_EAGER") == "1":
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _kernels_for(op: str, device: torch.device, packed: torch.Tensor, values: torch.Tensor | None,
                 dtype: torch.dtype | None = None):
    """The Triton module if it takes these tensors and agreed with eager on this device's first call."""
    if not fused_kernels_enabled(device):
        return None
    try:
        from model.net import kv_quant_triton as kernels
    except Exception as exc:  # noqa: BLE001 - no Triton: the eager path is the whole feature
        if ("import", "") not in _agrees:
            _agrees[("import", "")] = False
            log.warning("float8 KV cache: no Triton kernels (%s); packing in eager PyTorch", exc)
        return None
    if not kernels.fits(packed, values):
        return None
    key = (op, str(device))
    if key not in _agrees:
        _agrees[key] = _check_against_eager(kernels, op, packed, values, dtype)
        if not _agrees[key]:
            log.warning("float8 KV cache: the Triton %s kernel differs from eager PyTorch on %s; using eager", op,
                        device)
    return kernels if _agrees[key] else None


def _check_against_eager(kernels, op: str, packed: torch.Tensor, values: torch.Tensor | None,
                         dtype: torch.dtype | None) -> bool:
    try:
        if op == "pack":
            fused, eager = torch.zeros_like(packed), torch.zeros_like(packed)
            kernels.pack_into(fused, values)
            _pack_eager(eager, values)
        else:
            fused, eager = kernels.unpack(packed, dtype), _unpack_eager(packed, dtype)
        return torch.equal(fused, eager)
    except Exception as exc:  # noqa: BLE001 - a kernel that cannot build or run here leaves the eager path
        log.warning("float8 KV cache: Triton %s kernel failed on %s (%s)", op, packed.device, exc)
        return False


def store(dst: torch.Tensor, x: torch.Tensor) -> None:
    """Write x into a cache slice of either kind: packed float8, or a copy in the slice's dtype."""
    if is_packed(dst):
        pack_into(dst, x)
    else:
        dst.copy_(x)


def load(src: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A cache slice as values of `dtype`: widened if packed, else the slice itself (no copy if it is `dtype`)."""
    return unpack(src, dtype) if is_packed(src) else src.to(dtype)


def value_dtype(cache: torch.Tensor, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype keys and values are computed in before they reach this cache."""
    return model_dtype if is_packed(cache) else cache.dtype
