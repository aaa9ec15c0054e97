"""Float8 (e4m3) linear layers for the DiT: half the weight memory, and FP8 tensor-core GEMMs on Hopper.

`runtime.fp8` picks one of:
  none     the layers stay as loaded (bf16/float32).
  weights  weights kept in float8 with one float32 scale per output row; each call widens them to the
           activations' dtype and runs a normal GEMM (memory only: runs anywhere, a little slower).
  gemm     weights as above, activations quantised per token on the fly (one scale per row, from its
           absolute maximum), and the product taken by `torch._scaled_mm` in float8 with a bf16 result:
           about twice the bf16 tensor-core rate on H100/H200 (compute capability >= 8.9).

The float8 bits live in a bfloat16 parameter, two per element ([out, in/2], viewed as float8 [out, in] when
used): per-layer sharding (FSDP2 makes every shard a parameter that may require gradients, so it must be a
floating type) and the CPU's gloo backend (no float8 type) then move it as plain 16-bit words, bit for bit.
Row scaling means a row-sharded weight (FSDP shards dim 0) quantises shard by shard to the same bits as whole.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.config import FP8_MODES
from model.parallel.group import copy_full_into

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row keeps a finite scale
_GEMM_ALIGN = 16  # _scaled_mm needs both matrix dims of the weight divisible by 16
_CARRIER = torch.bfloat16  # the parameter's storage type: two float8 values per element


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (uint8 bits of float8 e4m3 [out, in], float32 scale [out, 1]), w ~= bits * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    bits = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)
    return bits, scale


def fp8_gemm_supported(device: torch.device) -> bool:
    """Float8 tensor-core GEMMs: CUDA devices of compute capability 8.9 (Ada) or newer, and the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


class QuantizedActivations(NamedTuple):
    """Activations as float8 rows with one float32 scale per row (token), ready for `torch._scaled_mm`."""

    bits: torch.Tensor  # float8 e4m3 [tokens, features]
    scale: torch.Tensor  # float32 [tokens, 1]
    lead_shape: tuple[int, ...]  # the input's shape without its last dim
    dtype: torch.dtype  # the input's dtype (the output's)

    @classmethod
    def of(cls, x: torch.Tensor) -> QuantizedActivations:
        rows = x.reshape(-1, x.shape[-1])
        # one reduction for max |x| per row; the scale is rounded to the input's dtype so that the division
        # below (done in that dtype, no float32 copy of the activations) and the GEMM use the same number
        amax = torch.linalg.vector_norm(rows, ord=float("inf"), dim=1, keepdim=True)
        scale = (amax.float() / FP8_MAX).clamp_min(_MIN_SCALE).to(rows.dtype)
        bits = (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
        return cls(bits, scale.float(), tuple(x.shape[:-1]), x.dtype)


class Fp8Linear(nn.Module):
    """A drop-in `nn.Linear` (same `weight`/`bias` names, same maths within float8 rounding) in float8."""

    def __init__(self, in_features: int, out_features: int, bias: bool, gemm: bool,
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.in_features, self.out_features, self.gemm = in_features, out_features, gemm
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=_CARRIER, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: bool) -> Fp8Linear:
        """Quantise a loaded linear layer (or copy the shapes of one on the meta device)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gemm,
                    device=weight.device, bias_dtype=weight.dtype)
        if weight.device.type != "meta":
            layer.fill(weight.detach())
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def fill(self, weight: torch.Tensor) -> None:
        """Quantise the whole [out, in] `weight` into this layer; a row-sharded (DTensor) weight keeps its rows."""
        bits, scale = quantize_rows(weight.to(self.weight_scale.device))
        copy_full_into(self.weight, bits.view(_CARRIER))  # per-layer sharded: this rank's rows only
        self.weight_scale.copy_(scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight widened to `dtype` (what `weights` mode multiplies by)."""
        return self.fp8_weight.to(dtype) * self.weight_scale.to(dtype)

    @property
    def fp8_weight(self) -> torch.Tensor:
        """The float8 [out, in] matrix (a view of the bits in `weight`)."""
        return self.weight.view(torch.uint8).view(FP8_DTYPE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gemm:
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.forward_quantized(QuantizedActivations.of(x))

    def forward_quantized(self, xq: QuantizedActivations) -> torch.Tensor:
        """The float8 GEMM on activations already quantised (q, k and v share one quantisation of their input)."""
        # CUDA's row-scaled float8 GEMM writes bf16 only; the CPU's also writes float32.
        out_dtype = xq.dtype if xq.bits.device.type == "cpu" and xq.dtype == torch.float32 else torch.bfloat16
        out = torch._scaled_mm(xq.bits, self.fp8_weight.t(), scale_a=xq.scale,
                               scale_b=self.weight_scale.t(), out_dtype=out_dtype,
                               bias=None if self.bias is None else self.bias.to(out_dtype))
        return out.to(xq.dtype).reshape(*xq.lead_shape, self.out_features)

    def extra_repr(self) -> str:
        mode = "gemm" if self.gemm else "weights"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, fp8={mode}"


def quantizable(linear: nn.Module) -> bool:
    """A plain linear layer whose shape the float8 GEMM takes (both dims multiples of 16)."""
    return (type(linear) is nn.Linear and linear.in_features % _GEMM_ALIGN == 0
            and linear.out_features % _GEMM_ALIGN == 0)


def quantize_linears(roots: Iterable[nn.Module], mode: str) -> int:
    """Swap every quantizable `nn.Linear` under `roots` for an `Fp8Linear` in `mode`; returns how many.

    Works on loaded modules (each layer is quantised as it is swapped, so the peak is the model plus one
    layer) and on modules built on the meta device (shapes only: fill them with `Fp8Linear.fill`).
    """
    if mode not in FP8_MODES:
        raise ValueError(f"--runtime.fp8: must be one of {FP8_MODES}, got {mode!r}")
    if mode == "none":
        return 0
    count = 0
    for root in roots:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if quantizable(child):
                    setattr(parent, name, Fp8Linear.from_linear(child, gemm=mode == "gemm"))
                    count += 1
    return count
