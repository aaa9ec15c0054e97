"""The one self-attention call of the DiT, and the seam where sequence parallelism plugs in.

Every self-attention of `model/net/dit.py` (denoising, commit and sink prefill) calls `attention(q, k, v)`
with q [B, Sq, H, D] and k, v [B, Sk, H, D] (Sk >= Sq: keys also hold the sink and the rolling window).
Nothing else in the model knows whether it runs on one process or many.

Sequence-parallel hook (Ulysses): `model/parallel/group.py` calls `set_sequence_parallel(group)` with an object
that has
    shard_tokens(x, dim=1) -> this rank's share of the tokens along `dim`
    gather_tokens(x, dim=1) -> all ranks' shares concatenated in rank order
    attention(q, k, v, attend) -> token-sharded attention: all-to-all heads<->sequence around `attend`
The DiT then shards its token sequence (and the matching RoPE tables) right after the patch embedding,
keeps only its shard of every K/V it caches, gathers full frames around the audio injection, and gathers
the output tokens before the head. With no group set (the default) all three are the identity and
`attention` is plain scaled-dot-product attention.

Kernel choice: `set_attention_backend` ('auto', 'flash', 'cudnn', 'efficient', 'math', from
`runtime.attention_backend`) puts one SDPA backend first for the DiT's attention; the others stay as
fall-backs, so a shape or device the preferred kernel cannot take (the CPU, say) still runs.
'fp8' (`model/net/attention_fp8.py`) is a float8 flash-attention kernel that reads keys and values straight
from a packed float8 KV cache (no widening pass); it is used only inside `attention_into` when the cache is
packed, the device is CUDA with capability >= 8.9, autograd is off and no sequence-parallel group is set (the
Ulysses all-to-all moves the cache's rows as values of the model's dtype; the packed rows would need their own
exchange, untested, so a group keeps the widening path). Everywhere else 'fp8' is 'auto' (PyTorch's SDPA
choice), with one log line at the first such call saying why. Unlike the widening path, it attends to the
call's own keys and values as rounded into the cache.
Compiled DiT blocks reach `attention` through `compiled_attention`, one opaque op for torch.compile,
so the sequence-parallel all-to-all inside it never breaks the block's graph.

KV cache in place: `attention_into` writes this call's (already rotated) keys and values into a slot
of a cache slice [B, T, H, D] and attends over the whole slice: the keys and values attention reads are
the cache itself, no per-call concatenation of the memory and the new tokens. Under torch.compile that
is one op that declares the cache slices it mutates (`liveavatar::attention_into`), so the write and
the attention stay in the block's graph and the slices are updated in place. A float8 cache
(`runtime.kv_cache_dtype float8`, `model/net/kv_quant.py`) is written packed and widened inside that op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.net import kv_quant

log = logging.getLogger(__name__)

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SequenceParallel(Protocol):
    """What the DiT needs from a sequence-parallel group (implemented by `model.parallel.group.ParallelGroup`)."""

    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor: ...

    def gather_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor: ...

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: AttendFn
    ) -> torch.Tensor: ...


class _SingleProcess:
    """The identity group: one process holds every token and every head."""

    def shard_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def gather_tokens(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return x

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend: AttendFn) -> torch.Tensor:
        return attend(q, k, v)


_SINGLE = _SingleProcess()
_group: SequenceParallel = _SINGLE


def set_sequence_parallel(group: SequenceParallel | None) -> SequenceParallel | None:
    """Route attention and token sharding through `group` (None: one process); returns the old one."""
    global _group
    previous = None if _group is _SINGLE else _group
    _group = _SINGLE if group is None else group
    return previous


def sequence_parallel() -> SequenceParallel:
    """The group the DiT shards its tokens over (the identity group on one process)."""
    return _group


ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fp8")
_BACKEND_ENUMS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
_backend_name = "auto"
_backend_order: list[SDPBackend] | None = None  # None: PyTorch's own choice


def set_attention_backend(name: str) -> str:
    """Prefer one SDPA backend for the DiT's attention ('auto' = PyTorch's choice); returns the old name."""
    global _backend_name, _backend_order
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--runtime.attention_backend: must be one of {ATTENTION_BACKENDS}, got {name!r}")
    previous = _backend_name
    _backend_name = name
    if name in ("auto", "fp8"):  # fp8: its fall-back is PyTorch's choice
        _backend_order = None
    else:
        first = _BACKEND_ENUMS[name]
        _backend_order = [first] + [b for b in _BACKEND_ENUMS.values() if b != first]
    return previous


def attention_backend() -> str:
    return _backend_name


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on one device: [B, Sq, H, D] x [B, Sk, H, D] -> [B, Sq, H, D]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if _backend_order is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        with sdpa_kernel(_backend_order, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention of the DiT: q/k/v [B, S, heads, head_dim] -> [B, Sq, heads, head_dim]."""
    return _group.attention(q, k, v, local_attention)


@torch.library.custom_op("liveavatar::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return attention(q, k, v).contiguous()


@_attention_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def compiled_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention`, as one opaque op while torch.compile traces (eager: the plain call)."""
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v)
    return attention(q, k, v)


@torch.library.custom_op("liveavatar::attention_into", mutates_args=("key_cache", "value_cache"))
def _attention_into_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, start: int
) -> torch.Tensor:
    _write(k, v, key_cache, value_cache, start)
    return _attend_cache(q, k, v, key_cache, value_cache, start).contiguous()


@_attention_into_op.register_fake
def _(q, k, v, key_cache, value_cache, start):
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


def _write(k, v, key_cache, value_cache, start: int) -> None:
    kv_quant.store(key_cache[:, start : start + k.shape[1]], k)
    kv_quant.store(value_cache[:, start : start + v.shape[1]], v)


_fp8_fallbacks: set[str] = set()  # reasons already logged for `runtime.attention_backend fp8`


def _fp8_fallback(reason: str) -> None:
    if reason not in _fp8_fallbacks:
        _fp8_fallbacks.add(reason)
        log.warning("runtime.attention_backend fp8: %s; using PyTorch's SDPA here", reason)


_fp8_emulated = False  # CPU quality runs: the kernel's arithmetic in PyTorch where the kernel cannot run


def emulate_fp8_attention(on: bool) -> bool:
    """Under 'fp8', run `attention_fp8.reference` (the kernel's arithmetic, CUDA tiles) wherever the kernel
    cannot run on a packed cache (the CPU): how `bench/kv_cache_quality.py` measures its effect on frames.
    Returns the old setting."""
    global _fp8_emulated
    previous, _fp8_emulated = _fp8_emulated, on
    return previous


def _attend_fp8(q, key_cache, value_cache) -> torch.Tensor | None:
    """The float8 kernel's attention over the packed cache, or None (logged once per reason) where it cannot
    serve this read; with `emulate_fp8_attention(True)` its PyTorch emulation where only the device is missing."""
    try:
        from model.net import attention_fp8
    except Exception as exc:  # noqa: BLE001 - no Triton: SDPA is the whole feature
        _fp8_fallback(f"no Triton kernels ({exc})")
        return None
    if _group is not _SINGLE:
        reason = "a sequence-parallel group is set (the packed cache does not go through the all-to-all)"
    else:
        reason = attention_fp8.unsupported(q, key_cache, value_cache)
        if reason is None and not attention_fp8.agrees(q, key_cache, value_cache):
            reason = f"the Triton kernel did not build or differs from its PyTorch emulation on {q.device}"
        if reason is None:
            return attention_fp8.attention(q, key_cache, value_cache)
        if _fp8_emulated and kv_quant.is_packed(key_cache) and kv_quant.is_packed(value_cache):
            tiles = attention_fp8.CUDA_BLOCKS
            return attention_fp8.reference(q, key_cache, value_cache, tiles.block_n, tiles.pv_fp8)
    _fp8_fallback(reason)
    return None


def _attend_cache(q, k, v, key_cache, value_cache, start: int) -> torch.Tensor:
    """Attention over the cache slices; a float8 cache (`model.net.kv_quant`) is widened to q's dtype for
    this call, with the call's own tokens at their unrounded values (a block sees itself as in bf16), or,
    under `runtime.attention_backend fp8`, read packed by the float8 kernel (the call's own tokens rounded)."""
    if _backend_name == "fp8":
        out = _attend_fp8(q, key_cache, value_cache)
        if out is not None:
            return out
    if not kv_quant.is_packed(key_cache):
        return attention(q, key_cache, value_cache)
    keys, values = kv_quant.unpack(key_cache, q.dtype), kv_quant.unpack(value_cache, q.dtype)
    keys[:, start : start + k.shape[1]] = k
    values[:, start : start + v.shape[1]] = v
    return attention(q, keys, values)


def attention_into(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    start: int,
) -> torch.Tensor:
    """Write k, v [B, S, H, D] at tokens [start, start + S) of key_cache/value_cache [B, T, H, D] (views
    into the stream's KV buffers), then `attention(q, key_cache, value_cache)` -> [B, Sq, H, D].

    Compiled inference: one opaque op that mutates the two slices. Eager inference: the copies and
    the call. With autograd: the same writes (the cache keeps the graph, so a later read of these keys
    back-propagates into this call), attending over copies, since the next layer writes the same buffers.
    """
    grad = torch.is_grad_enabled()
    k = k.to(kv_quant.value_dtype(key_cache, q.dtype))
    v = v.to(kv_quant.value_dtype(value_cache, q.dtype))
    if torch.compiler.is_compiling() and not grad:
        return _attention_into_op(q, k, v, key_cache, value_cache, start)
    if grad:
        if _backend_name == "fp8":
            _fp8_fallback("autograd: the kernel is forward-only")
        if kv_quant.is_packed(key_cache):
            raise ValueError("--runtime.kv_cache_dtype float8 is for inference; train with the model's dtype")
        key_cache[:, start : start + k.shape[1]] = k
        value_cache[:, start : start + v.shape[1]] = v
        return attention(q, key_cache.clone(), value_cache.clone())
    _write(k, v, key_cache, value_cache, start)
    return _attend_cache(q, k, v, key_cache, value_cache, start)
