"""Float8 flash attention straight from the packed float8 KV cache (`runtime.attention_backend fp8`).

Why: with `runtime.kv_cache_dtype float8` the keys and values already sit in the cache as float8 e4m3 bits
with one power-of-two bf16 scale per (token, head) (`model/net/kv_quant.py`), yet attention widened the whole
slice to bf16 on every call and ran bf16 SDPA (31% of a steady 14B clip on one H200). This kernel reads the
packed rows as they are and runs both products on the float8 tensor cores, with float32 accumulation:

  scores  q is quantised per (token, head) to e4m3 on load, with a power-of-two scale computed exactly as the
          cache's (amax / 448 rounded up to a power of two); S = (q8 . k8^T) * sq_i * sk_j * log2(e) / sqrt(D).
  softmax online, in base 2, over key tiles of BLOCK_N, the running max and sum in float32.
  P . V   V's per-token scales are folded into P per key tile: P'_ij = P_ij * sv_j / max_tile(sv) * 256,
          rounded to e4m3 (P <= 1, so P' <= 256 < 448; the 256 keeps small weights out of e4m3's
          subnormals), the tile's float8 product multiplied back by max_tile(sv) / 256 and added in float32.
          Every scale is a power of two, so the folding itself is exact; only P's rounding to e4m3 (a
          relative half-step of 2^-4) is new. `pv_fp8=False` widens the V tile to bf16 in registers instead.

What it reads: the whole slice from the cache, the call's own keys and values included, so those are the
rounded float8 values (the widening path puts them back unrounded; here a block sees itself through the
cache's rounding too). Non-causal, no mask, forward only.

Not yet run on a GPU (BENCHMARKS.md: `bash bench/device_run.sh q` measures it): `agrees` runs it against `reference` on
each device's first call and the seam keeps SDPA where they differ or the kernel does not build.

`reference` is the same arithmetic in PyTorch (e4m3 rounding by torch's cast, the same tiling, so the same
per-tile maxima and P scales): the tests hold it to float32 attention and hold the kernel to it, on the CPU
under `TRITON_INTERPRET=1` (the interpreter's float-to-e4m3 cast does not round to nearest even, so there
the kernel rounds on the float's bits, `kv_quant_triton._e4m3_bits`; on a GPU it uses the hardware cast).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from model.net import kv_quant
from model.net.kv_quant_triton import _e4m3_bits

LOG2E = 1.4426950408889634
P_HEADROOM = 256.0  # P' = P * sv / max(sv) * 256 <= 256 < 448: small weights stay above e4m3's subnormals


class Blocks:
    """One launch configuration: tile sizes, warps, pipelining depth, and whether P.V runs in float8."""

    def __init__(self, block_m: int, block_n: int, num_warps: int, num_stages: int, pv_fp8: bool = True):
        self.block_m, self.block_n, self.num_warps, self.num_stages, self.pv_fp8 = (
            block_m, block_n, num_warps, num_stages, pv_fp8)

    @classmethod
    def parse(cls, text: str) -> Blocks:
        """'128,64,8,3,fp8' (BLOCK_M, BLOCK_N, num_warps, num_stages, P.V dtype fp8 | bf16)."""
        m, n, w, s, pv = text.split(",")
        if pv not in ("fp8", "bf16"):
            raise ValueError(f"P.V dtype must be fp8 or bf16, got {pv!r}")
        return cls(int(m), int(n), int(w), int(s), pv == "fp8")

    def __repr__(self) -> str:
        return f"{self.block_m},{self.block_n},{self.num_warps},{self.num_stages},{'fp8' if self.pv_fp8 else 'bf16'}"


# For the 14B's shape on one H200 (40 heads of 128, 3,168 queries against 15,312 keys): the usual Hopper
# flash-attention tiling, NOT yet measured on a GPU (BENCHMARKS.md; `bash bench/device_run.sh q` picks the
# fastest passing configuration); LIVEAVATAR_FP8_ATTENTION_BLOCKS overrides it for benches that compare them.
CUDA_BLOCKS = Blocks(128, 128, 8, 2, True)
INTERPRETED_BLOCKS = Blocks(16, 16, 4, 1, True)  # the CPU interpreter (tests): small tiles, few programs


def blocks_for(device: torch.device) -> Blocks:
    override = os.environ.get("LIVEAVATAR_FP8_ATTENTION_BLOCKS")
    if override:
        return Blocks.parse(override)
    return CUDA_BLOCKS if device.type == "cuda" else INTERPRETED_BLOCKS


# ----------------------------------------------------------------------------- the kernel


@triton.jit
def _to_e4m3(x, EXACT: tl.constexpr):
    """float32 (|x| <= 448) -> float8 e4m3, rounded to nearest even."""
    if EXACT:
        return _e4m3_bits(x).to(tl.float8e4nv, bitcast=True)
    else:
        return x.to(tl.float8e4nv)


@triton.jit
def _rows(base, rows, live, stride_t, D: tl.constexpr, MASK: tl.constexpr):
    """Packed rows [len(rows), D + 2] -> (their D float8 bytes, their bf16 power-of-two scales as float32)."""
    cols = tl.arange(0, D)
    if MASK:
        bits = tl.load(base + rows[:, None] * stride_t + cols[None, :], mask=live[:, None], other=0)
        low = tl.load(base + rows * stride_t + D, mask=live, other=0).to(tl.int32)
        high = tl.load(base + rows * stride_t + D + 1, mask=live, other=0).to(tl.int32)
    else:
        bits = tl.load(base + rows[:, None] * stride_t + cols[None, :])
        low = tl.load(base + rows * stride_t + D).to(tl.int32)
        high = tl.load(base + rows * stride_t + D + 1).to(tl.int32)
    return bits.to(tl.float8e4nv, bitcast=True), ((high << 24) | (low << 16)).to(tl.float32, bitcast=True)


@triton.jit
def _key_tile(acc, l_i, m_i, q8, q_scale, k_base, v_base, start_n, Sk, stride_kt, stride_vt,
              D: tl.constexpr, BLOCK_N: tl.constexpr, PV_FP8: tl.constexpr, EXACT: tl.constexpr,
              MASK: tl.constexpr):
    rows = start_n + tl.arange(0, BLOCK_N)
    live = rows < Sk
    k8, k_scale = _rows(k_base, rows, live, stride_kt, D, MASK)
    s = tl.dot(q8, tl.trans(k8))
    s = s * q_scale[:, None]
    s = s * k_scale[None, :]
    if MASK:
        s = tl.where(live[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v8, v_scale = _rows(v_base, rows, live, stride_vt, D, MASK)
    acc = acc * alpha[:, None]
    if PV_FP8:
        v_max = tl.max(v_scale, 0)
        p8 = _to_e4m3(p * (v_scale * (256.0 / v_max))[None, :], EXACT)
        pv = tl.dot(p8, v8)
        acc = acc + pv * (v_max / 256.0)
    else:
        v = (v8.to(tl.float32) * v_scale[:, None]).to(tl.bfloat16)
        if EXACT:  # the interpreter's bf16 dot reads the bits as integers: the same values in float32
            acc = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(p.to(tl.bfloat16), v, acc)
    return acc, l_i, m_new


@triton.jit
def _attention_fp8_kernel(q_ptr, k_ptr, v_ptr, o_ptr, Sq, Sk, qk_scale,
                          stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                          stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
                          H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          PV_FP8: tl.constexpr, EXACT: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    b = tl.program_id(1) // H
    h = tl.program_id(1) % H
    rows = start_m + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, D)
    q_live = rows < Sq
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + cols[None, :],
                mask=q_live[:, None], other=0.0).to(tl.float32)
    # per (token, head) power-of-two scale, as kv_quant packs: 2^e >= amax / 448
    amax = tl.maximum(tl.max(tl.abs(q), axis=1), 7.888609052210118e-31)
    exponent = (tl.math.div_rn(amax, 448.0).to(tl.int32, bitcast=True) >> 23) & 0xFF
    scale = ((exponent + 1) << 23).to(tl.float32, bitcast=True)
    inverse = ((253 - exponent) << 23).to(tl.float32, bitcast=True)
    q8 = _to_e4m3(tl.minimum(tl.maximum(q * inverse[:, None], -448.0), 448.0), EXACT)
    q_scale = scale * qk_scale

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = (Sk // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q8, q_scale, k_base, v_base, start_n, Sk, stride_kt,
                                  stride_vt, D, BLOCK_N, PV_FP8, EXACT, False)
    if full < Sk:
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q8, q_scale, k_base, v_base, full, Sk, stride_kt,
                                  stride_vt, D, BLOCK_N, PV_FP8, EXACT, True)
    out = acc / l_i[:, None]
    tl.store(o_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + cols[None, :],
             out.to(o_ptr.dtype.element_ty), mask=q_live[:, None])


# ----------------------------------------------------------------------------- the calls


def unsupported(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    """Why the kernel cannot take these tensors here (None: it can)."""
    if not (kv_quant.is_packed(key_cache) and kv_quant.is_packed(value_cache)):
        return "the KV cache is not float8 (runtime.kv_cache_dtype float8)"
    if torch.is_grad_enabled() and q.requires_grad:
        return "autograd: the kernel is forward-only"
    device = q.device
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return f"the device is {device.type}, not CUDA"
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return f"CUDA capability {torch.cuda.get_device_capability(device)} < (8, 9) has no float8 tensor cores"
    d = q.shape[-1]
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"queries in {q.dtype}"
    if d < 16 or d & (d - 1) or key_cache.shape[-1] != d + kv_quant.SCALE_BYTES:
        return f"head_dim {d} (a power of two >= 16, matching the cache's rows) is needed"
    if key_cache.shape != value_cache.shape or key_cache.shape[:1] != q.shape[:1] or key_cache.shape[2] != q.shape[2]:
        return f"shapes q {list(q.shape)}, cache {list(key_cache.shape)} / {list(value_cache.shape)}"
    if q.stride(-1) != 1 or key_cache.stride(-1) != 1 or value_cache.stride(-1) != 1:
        return "rows that are not contiguous"
    return None


def attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
              blocks: Blocks | None = None) -> torch.Tensor:
    """q [B, Sq, H, D] over the packed caches uint8 [B, Sk, H, D + 2] -> [B, Sq, H, D] in q's dtype."""
    reason = unsupported(q, key_cache, value_cache)
    if reason is not None:
        raise ValueError(f"float8 attention: {reason}")
    blocks = blocks or blocks_for(q.device)
    b, sq, h, d = q.shape
    sk = key_cache.shape[1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if sq == 0 or b == 0:
        return out
    if sk == 0:
        raise ValueError("float8 attention: no keys")
    grid = (triton.cdiv(sq, blocks.block_m), b * h)
    _attention_fp8_kernel[grid](
        q, key_cache, value_cache, out, sq, sk, LOG2E / math.sqrt(d),
        q.stride(0), q.stride(1), q.stride(2), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H=h, D=d, BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, PV_FP8=blocks.pv_fp8,
        EXACT=q.device.type != "cuda", num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    return out


_agrees: dict[str, bool] = {}  # device -> the kernel built, ran and matched `reference` there on its first call


def agrees(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> bool:
    """On each device's first call: run the kernel and `reference` on a corner of these very inputs (two heads,
    up to 256 queries, every key) and compare (relative error < 1e-2); a kernel that does not build, fails
    or differs there is not used on that device (logged once, by the caller)."""
    key = str(q.device)
    if key not in _agrees:
        try:
            heads = min(2, q.shape[2])
            corner = q[:1, :256, :heads]
            kc, vc = key_cache[:1, :, :heads], value_cache[:1, :, :heads]
            out = attention(corner, kc, vc).float()
            ref = reference(corner, kc, vc).float()
            _agrees[key] = bool(torch.isfinite(out).all()) and float((out - ref).norm() / ref.norm()) < 1e-2
        except Exception:  # noqa: BLE001 - a kernel that cannot build or run here leaves the SDPA path
            _agrees[key] = False
    return _agrees[key]


# ----------------------------------------------------------------------------- the same arithmetic in PyTorch


def _unpacked(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed [B, S, H, D + 2] -> (e4m3 values as float32 [B, H, S, D], scales float32 [B, H, S])."""
    d = cache.shape[-1] - kv_quant.SCALE_BYTES
    bits = cache[..., :d].contiguous().view(kv_quant.FP8_DTYPE).float().transpose(1, 2)
    scale = cache[..., d:].contiguous().view(kv_quant.SCALE_DTYPE).float()[..., 0].transpose(1, 2)
    return bits, scale


def reference(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_n: int | None = None,
              pv_fp8: bool | None = None) -> torch.Tensor:
    """The kernel's arithmetic in PyTorch, tile by tile (any device): [B, Sq, H, D] in q's dtype."""
    default = blocks_for(q.device)
    block_n = block_n or default.block_n
    pv_fp8 = default.pv_fp8 if pv_fp8 is None else pv_fp8
    d = q.shape[-1]
    q_bits, q_scale = kv_quant.quantize(q.float().transpose(1, 2))  # [B, H, Sq, D], [B, H, Sq, 1]
    q8 = q_bits.float()
    q_scale = q_scale.float() * (LOG2E / math.sqrt(d))
    k8, k_scale = _unpacked(key_cache)
    v8, v_scale = _unpacked(value_cache)
    m = torch.full(q8.shape[:-1], float("-inf"), device=q.device)
    l_sum = torch.zeros_like(m)
    acc = torch.zeros_like(q8)
    for start in range(0, k8.shape[2], block_n):
        stop = start + block_n
        s = (q8 @ k8[:, :, start:stop].transpose(-1, -2)) * q_scale
        s = s * k_scale[:, :, None, start:stop]
        m_new = torch.maximum(m, s.amax(-1))
        alpha = torch.exp2(m - m_new)
        p = torch.exp2(s - m_new[..., None])
        l_sum = l_sum * alpha + p.sum(-1)
        acc = acc * alpha[..., None]
        vs = v_scale[:, :, start:stop]
        if pv_fp8:
            v_max = vs.amax(-1, keepdim=True)  # [B, H, 1]
            p8 = (p * (vs * (P_HEADROOM / v_max))[:, :, None, :]).to(kv_quant.FP8_DTYPE).float()
            acc = acc + (p8 @ v8[:, :, start:stop]) * (v_max / P_HEADROOM)[..., None]
        else:
            v = (v8[:, :, start:stop] * vs[..., None]).to(torch.bfloat16).float()
            acc = acc + p.to(torch.bfloat16).float() @ v
        m = m_new
    return (acc / l_sum[..., None]).transpose(1, 2).to(q.dtype)
