"""The one self-attention call of the DiT, and the seam where sequence parallelism plugs in.

Every self-attention of `model/dit.py` (denoising, commit and sink prefill) calls `attention(q, k, v)`
with q [B, Sq, H, D] and k, v [B, Sk, H, D] (Sk >= Sq: keys also hold the sink and the rolling window).
Nothing else in the model knows whether it runs on one process or many.

Sequence-parallel hook (Ulysses): `model/parallel.py` calls `set_sequence_parallel(group)` with an object
that has
    shard_tokens(x, dim=1) -> this rank's share of the tokens along `dim`
    gather_tokens(x, dim=1) -> all ranks' shares concatenated in rank order
    attention(q, k, v, attend) -> token-sharded attention: all-to-all heads<->sequence around `attend`
The DiT then shards its token sequence (and the matching RoPE tables) right after the patch embedding,
keeps only its shard of every K/V it caches, gathers full frames around the audio injection, and gathers
the output tokens before the head. With no group set (the default) all three are the identity and
`attention` is plain scaled-dot-product attention.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
import torch.nn.functional as F

AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SequenceParallel(Protocol):
    """What the DiT needs from a sequence-parallel group (implemented by `model.parallel.ParallelGroup`)."""

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


def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention on one device: [B, Sq, H, D] x [B, Sk, H, D] -> [B, Sq, H, D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Self-attention of the DiT: q/k/v [B, S, heads, head_dim] -> [B, Sq, heads, head_dim]."""
    return _group.attention(q, k, v, local_attention)
