"""Float8 (e4m3) linear layers for the DiT: half the weight memory, and FP8 tensor-core GEMMs on Hopper.

`runtime.fp8` picks one of:
  none     the layers stay as loaded (bf16/float32).
  weights  weights kept in float8 with one float32 scale per output row; each call widens them to the
           activations' dtype and runs a normal GEMM (memory only: runs anywhere, a little slower).
  gemm     weights as above, activations quantised per token on the fly (one scale per row, from its
           absolute maximum), and the product taken by `torch._scaled_mm` in float8 with a bf16 result:
           about twice the bf16 tensor-core rate on H100/H200 (compute capability >= 8.9).
  tensor   LiveAvatar's `--fp8` (liveavatar/utils/fp8_linear.py `FP8ScaleLinear`): ONE scale for the whole
           weight and ONE for the whole activation matrix of each call, both min(448 / max|x|, 448) (so a
           tensor whose largest entry is below 1 is not stretched to the full e4m3 range), the product by
           `torch._scaled_mm(..., use_fast_accum=True)` with a bf16 result cast back to the input's dtype.
           Coarser than `gemm` (one outlier sets the step of the whole tensor); it is what the reference
           scripts run. The same layers as the other modes: `REFERENCE_FP8_EXCLUDED`. The reference never
           splits the sequence (one GPU, or TPP: a whole sequence per GPU); under Ulysses sequence parallelism
           each rank takes the activation scale from its own tokens, so with more than one DiT rank the
           output moves at float8-rounding level (about 1e-2 absolute on the tiny DiT) with the rank count.
  auto     `tensor` on a CUDA GPU with float8 tensor cores (compute capability >= 8.9: Ada, Hopper), `none`
           anywhere else (`resolve_mode`): the 14B preset's default. It is what the reference scripts run
           (`--fp8`) and, on one H200 through the engine path, as fast as `gemm` (12.7 vs 12.6 FPS, BENCHMARKS.md).

The float8 bits live in a bfloat16 parameter, two per element ([out, in/2], viewed as float8 [out, in] when
used): per-layer sharding (FSDP2 makes every shard a parameter that may require gradients, so it must be a
floating type) and the CPU's gloo backend (no float8 type) then move it as plain 16-bit words, bit for bit.
Row scaling means a row-sharded weight (FSDP shards dim 0) quantises shard by shard to the same bits as whole;
a per-tensor layer is filled from the whole weight (`Fp8Linear.fill`) and keeps its one scale in every row.
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
ROW_MODES = ("weights", "gemm")  # per-row weight scales: the two can switch into each other in place
TENSOR_MODE = "tensor"
# The layers LiveAvatar's `--fp8` leaves in bf16 (minimal_inference/s2v_streaming_interact.py, the
# `ignore_keys` given to replace_linear_with_scaled_fp8: matched as substrings of the module names
# text_embedding, time_embedding, time_projection, head.head, casual_audio_encoder.encoder.final_linear),
# under this model's names. Every other nn.Linear of that model is converted: the q/k/v/o and FFN layers
# of the blocks and the audio injectors' q/k/v/o and AdaIN linears, which is what
# `AvatarDiT.quantize_fp8` converts (tests/model/test_fp8.py checks the two lists name the same layers).
REFERENCE_FP8_EXCLUDED = (
    "condition_embedder.text_embedder",  # text_embedding.0 / .2
    "condition_embedder.time_embedder",  # time_embedding.0 / .2
    "condition_embedder.time_proj",  # time_projection.1
    "proj_out",  # head.head
    "casual_audio_encoder.encoder.final_linear",
)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float weight -> (uint8 bits of float8 e4m3 [out, in], float32 scale [out, 1]), w ~= bits * scale."""
    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    bits = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(torch.uint8)
    return bits, scale


def quantize_tensor(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Any float tensor -> (float8 e4m3 bits, float32 0-dim scale), tensor ~= bits * scale, as LiveAvatar's
    `quant_fp8`: multiplier min(448 / max|x|, 448), product in float32 (its compiled kernel computes there),
    clamped to +-448, rounded to e4m3; the scale is the multiplier's reciprocal."""
    x = tensor.float()
    multiplier = (FP8_MAX / x.abs().amax().clamp_min(_MIN_SCALE)).clamp_max(FP8_MAX)
    bits = (x * multiplier).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return bits, multiplier.reciprocal()


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode `runtime.fp8` means on `device`: `auto` becomes tensor on CUDA GPUs of compute capability 8.9+
    and none elsewhere (a model still on `meta` is judged by this process's current CUDA device, if any)."""
    if mode != "auto":
        return mode
    if device.type == "meta" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return TENSOR_MODE if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9) else "none"


def fp8_gemm_supported(device: torch.device) -> bool:
    """Float8 tensor-core GEMMs: CUDA devices of compute capability 8.9 (Ada) or newer, and the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu"


class QuantizedActivations(NamedTuple):
    """Activations as float8 rows with float32 scales, one per row (token) or one for all, for `torch._scaled_mm`."""

    bits: torch.Tensor  # float8 e4m3 [tokens, features]
    scale: torch.Tensor  # float32 [tokens, 1], or 0-dim (per tensor)
    lead_shape: tuple[int, ...]  # the input's shape without its last dim
    dtype: torch.dtype  # the input's dtype (the output's)

    @property
    def per_tensor(self) -> bool:
        return self.scale.ndim == 0

    @classmethod
    def of_tensor(cls, x: torch.Tensor) -> QuantizedActivations:
        """One scale for the whole activation matrix (the `tensor` mode, LiveAvatar's input quantisation)."""
        bits, scale = quantize_tensor(x.reshape(-1, x.shape[-1]))
        return cls(bits, scale, tuple(x.shape[:-1]), x.dtype)

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
                 device: torch.device | str | None = None, bias_dtype: torch.dtype = torch.bfloat16,
                 per_tensor: bool = False) -> None:
        super().__init__()
        if per_tensor and not gemm:
            raise ValueError("a per-tensor float8 layer runs the float8 GEMM (runtime.fp8 tensor)")
        self.in_features, self.out_features, self.gemm = in_features, out_features, gemm
        self.per_tensor = per_tensor  # one weight scale (kept in every row of weight_scale) and one per input
        self.weight = nn.Parameter(torch.empty(out_features, in_features // 2, dtype=_CARRIER, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(out_features, 1, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, gemm: bool, per_tensor: bool = False) -> Fp8Linear:
        """Quantise a loaded linear layer (or copy the shapes of one on the meta device)."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, gemm,
                    device=weight.device, bias_dtype=weight.dtype, per_tensor=per_tensor)
        if weight.device.type != "meta":
            layer.fill(weight.detach())
            if linear.bias is not None:
                layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def fill(self, weight: torch.Tensor) -> None:
        """Quantise the whole [out, in] `weight` into this layer; a row-sharded (DTensor) weight keeps its rows."""
        weight = weight.to(self.weight_scale.device)
        if self.per_tensor:
            bits, scale = quantize_tensor(weight)
            bits, scale = bits.view(torch.uint8), scale.expand(self.out_features, 1)
        else:
            bits, scale = quantize_rows(weight)
        copy_full_into(self.weight, bits.view(_CARRIER))  # per-layer sharded: this rank's rows only
        self.weight_scale.copy_(scale)

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight widened to `dtype` (what `weights` mode multiplies by)."""
        return self.fp8_weight.to(dtype) * self.weight_scale.to(dtype)

    @property
    def fp8_weight(self) -> torch.Tensor:
        """The float8 [out, in] matrix (a view of the bits in `weight`)."""
        return self.weight.view(torch.uint8).view(FP8_DTYPE)

    def quantize_input(self, x: torch.Tensor) -> QuantizedActivations:
        """`x` quantised as this layer's GEMM takes it (per token, or per tensor); layers fed the same input
        (q, k and v) can share it: the quantisation depends on the input alone."""
        return QuantizedActivations.of_tensor(x) if self.per_tensor else QuantizedActivations.of(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.gemm:
            return F.linear(x, self.dequantized(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return self.forward_quantized(self.quantize_input(x))

    def forward_quantized(self, xq: QuantizedActivations) -> torch.Tensor:
        """The float8 GEMM on activations already quantised (q, k and v share one quantisation of their input)."""
        if self.per_tensor:
            return self._forward_per_tensor(xq)
        # CUDA's row-scaled float8 GEMM writes bf16 only; the CPU's also writes float32.
        out_dtype = xq.dtype if xq.bits.device.type == "cpu" and xq.dtype == torch.float32 else torch.bfloat16
        out = torch._scaled_mm(xq.bits, self.fp8_weight.t(), scale_a=xq.scale,
                               scale_b=self.weight_scale.t(), out_dtype=out_dtype,
                               bias=None if self.bias is None else self.bias.to(out_dtype))
        return out.to(xq.dtype).reshape(*xq.lead_shape, self.out_features)

    def _forward_per_tensor(self, xq: QuantizedActivations) -> torch.Tensor:
        """LiveAvatar's FP8LinearFunction: tensor-wise scales, fast accumulation, bf16 out (bias added in the
        GEMM, in bf16), then the input's dtype. On the CPU `use_fast_accum` changes nothing; on Hopper it
        accumulates in the tensor cores' reduced precision, which only a GPU run shows."""
        if not xq.per_tensor:
            raise ValueError("a per-tensor float8 layer needs per-tensor activations (Fp8Linear.quantize_input)")
        # both scales as [1, 1] tensors: torch 2.11's inductor cannot lower a 0-dim scale that is a view
        out = torch._scaled_mm(xq.bits, self.fp8_weight.t(), scale_a=xq.scale.reshape(1, 1),
                               scale_b=self.weight_scale[:1, :1],
                               bias=None if self.bias is None else self.bias.to(torch.bfloat16),
                               out_dtype=torch.bfloat16, use_fast_accum=True)
        return out.to(xq.dtype).reshape(*xq.lead_shape, self.out_features)

    @property
    def mode(self) -> str:
        """The `runtime.fp8` mode this layer runs."""
        return TENSOR_MODE if self.per_tensor else ("gemm" if self.gemm else "weights")

    def extra_repr(self) -> str:
        mode = self.mode
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
                    setattr(parent, name, Fp8Linear.from_linear(child, gemm=mode != "weights",
                                                                per_tensor=mode == TENSOR_MODE))
                    count += 1
    return count


def switch_mode(layers: Iterable[Fp8Linear], mode: str) -> int:
    """Run float8 layers in another mode; returns how many. `weights` and `gemm` share their per-row bits;
    the per-tensor bits of `tensor` are another rounding of the weights, so going to or from it needs them
    loaded again (refused with a message)."""
    layers = list(layers)
    for layer in layers:
        if mode == "none" or (mode == TENSOR_MODE) != layer.per_tensor:
            raise ValueError(f"--runtime.fp8 {mode}: this model's weights are float8 already, quantised for "
                             f"--runtime.fp8 {layer.mode}; reload it to change to {mode}")
    for layer in layers:
        layer.gemm = mode != "weights"
    return len(layers)
