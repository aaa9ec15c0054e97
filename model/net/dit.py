"""The audio-conditioned DiT of the Wan2.2-S2V / LiveAvatar family, streamed block by block.

Streaming API (what `model/stream/avatar.py` codes against):

    dit = AvatarDiT(cfg.model.dit)                       # any size from DiTConfig
    cache = dit.new_cache(batch_size, device, dtype, motion_rope="follow")
        # StreamCache: fixed-size buffers, allocated once. motion_rope: where the FramePack motion tokens
        # sit in RoPE frames over the stream: "absolute" keeps them at their frames of the sink pass
        # (-1 .. -19) for the whole stream, as LiveAvatar does; "follow" moves them with the window, just
        # behind its oldest committed block (bounded distance).
    dit.prefill(cache, ref_latent, text_context, motion_latents=None)
        # ref_latent [B,16,1,h,w]: attention sink (K/V kept for the whole session);
        # text_context [B, L<=text_len, text_dim]: projected and its K/V cached once per layer;
        # motion_latents [B,16,T,h,w] (optional, e.g. the previous clip's latents): packed FramePack-style
        # (1 + 2 + 16 latent frames) into the sink. Calling prefill again replaces the sink and the text,
        # and keeps the rolling window (that is how the motion context of the previous clip is refreshed).
    v = dit(noisy, timestep, audio, cache, frame_start, sink_distance=None)
        # noisy [B,16,F,h,w], timestep [B] in 0..1000, audio [B, 4*F, num_audio_layers, audio_dim]
        # (wav2vec2 hidden states of every layer, one row per video frame of this block),
        # frame_start: index of the block's first latent frame in the stream (int, 0, F, 2F, ...).
        # Returns the flow velocity, same shape as `noisy`, float32. Does not modify the cache, unless
        # store_slot=True: then this call's K/V are the block's window entry (no commit pass needed).
        # sink_distance: None puts the reference sink REF_FRAME_OFFSET (30) frames ahead of the block;
        # an int d puts it at absolute latent frame max(30, frame_start + d), LiveAvatar's rule for its
        # per-call draw d in 4..30 (causal_model_s2v.py `relative_dist`, rollout of the ref grid).
    dit.commit(cache, clean, audio, frame_start, sink_distance=None)
        # runs the clean block at timestep 0 and appends its K/V to the rolling window
        # (the window keeps kv_cache_blocks - 1 committed blocks; with the block being denoised that is
        # kv_cache_blocks blocks, one clip of the reference: 4 x 3 latent frames).

F = cfg.num_frames_per_block latent frames. A block attends to the sink, the committed window and
itself, never to later blocks. RoPE is relative (R(p_q) q . R(p_k) k depends on p_k - p_q only), so
keys are stored already rotated at their absolute latent frame and never rotated again: a block's
queries and keys are rotated at frames frame_start..., committed keys keep theirs. The sink (reference
and motion tokens) moves with the stream (`_sink_positions_at`): its keys are kept un-rotated and
rotated into a region next to the window once per sink layout (block, sink distance), shared by the
calls that use that layout (a distance drawn per call rotates per call). Angles are
float64, tables float32, so hours of stream (frame ~10^6) give the output of frame 0 within float
rounding (see `model/net/rope.py`).

Sequence parallelism hook: every self-attention call goes through `model.net.attention.attention`;
`model/parallel/group.py` wraps it (Ulysses all-to-all heads<->sequence) via
`model.net.attention.set_sequence_parallel(...)` without touching the layers (see that module).

Speed (same results within float tolerance; `AvatarDiT.apply_runtime(cfg.runtime)` after loading):
RoPE tables are built on the device (no host copies) once per block; a call rotates only its own
queries and keys, writes its keys and values into a working slot right after the rotated sink, and
attends over one contiguous slice of the cache (no rotation of the memory, no concatenation); commit
copies the working slot into the window. A block is a function of tensors plus that one declared
in-place cache write (`model.net.attention.attention_into`), so `runtime.compile` compiles it once for all
layers without graph breaks; `runtime.fuse_qkv` runs q/k/v as one GEMM and `runtime.attention_backend`
picks the SDPA kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.normalization import FP32LayerNorm
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding, WanTransformerBlock
from torch import nn

from model.config import DiTConfig, RuntimeConfig
from model.net import kv_quant
from model.net.attention import (
    attention,
    attention_into,
    local_attention,
    sequence_parallel,
    set_attention_backend,
)
from model.net.audio import AudioInjector, CausalAudioEncoder
from model.net.fp8 import Fp8Linear, fp8_gemm_supported, quantize_linears, resolve_mode, switch_mode
from model.net.motion import MOTION_LATENT_FRAMES, FramePackMotioner
from model.net.rope import (
    RotationTables,
    eager_fast_path,
    grid_positions,
    rotate,
    rotate_into,
    rotation_tables,
)
from model.parallel.group import is_sharded

# The reference places the reference-image sink at latent frame 30 (Wan2.2 model_s2v.py ref_grid_sizes
# [30, 0, 0]) and LiveAvatar rolls it forward with the stream: each call draws d in 4..30 and the sink
# sits at absolute frame max(30, frame_start + d) (causal_model_s2v.py `relative_dist`, `start_idx`,
# `num_frames_cond_rollout`; causal_s2v_utils.py `rollout_grid_sizes`). `sink_distance` takes such a d;
# without one the sink stays a fixed REF_FRAME_OFFSET frames ahead of the block (deterministic, and the
# reference's layout for the block at frame 0).
REF_FRAME_OFFSET = 30
MOTION_ROPE_FOLLOW, MOTION_ROPE_ABSOLUTE = "follow", "absolute"
MOTION_ROPE_MODES = (MOTION_ROPE_FOLLOW, MOTION_ROPE_ABSOLUTE)
NUM_AUDIO_TOKENS = 4  # Wan2.2 WanModel_S2V num_audio_token default
COND_MASK_NOISY, COND_MASK_REF, COND_MASK_MOTION = 0, 1, 2  # rows of `trainable_cond_mask`
SINK_KIND_REF, SINK_KIND_MOTION = 0, 1
# Block rotation tables kept per stream (one per frame_start; a block's calls share one), oldest dropped first.
ROPE_LAYOUTS_KEPT = 4


class StreamStateError(ValueError):
    """The streaming calls came in an order or with shapes the cache cannot serve; the message says which."""


# ----------------------------------------------------------------------------- cache


@dataclass
class StreamCache:
    """K/V of one stream: text (fixed), sink (ref + motion), a working slot and a ring of committed blocks.

    Buffers are allocated once at the first `prefill` and never grow. Per layer, with n = sink_tokens
    and b = block_tokens (each b tokens: the working slot, then the `num_slots` window slots):

        kv_k: [raw sink n | rotated sink n | working slot b | slot 0 b | ... ]   (keys)
        kv_v: [sink n     |                  working slot b | slot 0 b | ... ]   (values)

    Raw sink keys are un-rotated (`copy_sink` copies them with the values); the rotated sink holds them
    rotated for the layout in `rotated_sink_for` (block start, reference frame, sink); the working slot
    holds the last call's rotated keys; window slots hold committed keys rotated at their absolute frames. A call attends over
    kv_k[n : 2n + (1 + filled) b] and kv_v[: n + (1 + filled) b], one slice each.
    """

    batch_size: int
    device: torch.device
    dtype: torch.dtype
    num_slots: int
    motion_rope: str = MOTION_ROPE_FOLLOW  # MOTION_ROPE_*: motion tokens' RoPE frames over the stream
    text_k: torch.Tensor | None = None  # [L, B, text_len, H, D]
    text_v: torch.Tensor | None = None
    kv_k: torch.Tensor | None = None  # [L, B, 2 * sink + (1 + slots) * block, H, D]
    kv_v: torch.Tensor | None = None  # [L, B, sink + (1 + slots) * block, H, D]
    sink_tokens: int = 0
    block_tokens: int = 0
    latent_hw: tuple[int, int] | None = None
    sink_positions: torch.Tensor | None = None  # [sink_tokens, 3] before the per-call offsets
    sink_kind: torch.Tensor | None = None  # [sink_tokens] SINK_KIND_*
    block_positions: torch.Tensor | None = None  # [block_tokens, 3] of a block starting at frame 0
    slot_frame_start: list[int | None] = field(default_factory=list)
    next_slot: int = 0
    # (frame_start, reference frame, sink_positions object) the rotated sink was made for: a new sink
    # (prefill, copy_sink) brings a new positions tensor, so holding the object tells a stale rotation apart.
    rotated_sink_for: tuple[int, int, torch.Tensor] | None = None
    rope: dict[tuple, RotationTables] = field(default_factory=dict)  # block tables per frame_start
    device_positions: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def ready(self) -> bool:
        return self.kv_k is not None

    @property
    def filled_slots(self) -> int:
        return sum(s is not None for s in self.slot_frame_start)

    @property
    def last_committed_frame(self) -> int | None:
        starts = [s for s in self.slot_frame_start if s is not None]
        return max(starts) if starts else None

    def slot_start(self, slot: int) -> int:
        """First token of window slot `slot` in kv_v (add sink_tokens for kv_k); -1 is the working slot."""
        return self.sink_tokens + (1 + slot) * self.block_tokens

    def window_k(self) -> torch.Tensor:
        """Keys of the committed window slots [L, B, slots * block, H, D] (a view)."""
        return self.kv_k[:, :, self.sink_tokens + self.slot_start(0) :]

    def window_v(self) -> torch.Tensor:
        return self.kv_v[:, :, self.slot_start(0) :]

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (constant after the first prefill)."""
        tensors = (self.text_k, self.text_v, self.kv_k, self.kv_v)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def clear(self) -> None:
        """Drop every buffer (the session ended)."""
        self.text_k = self.text_v = self.kv_k = self.kv_v = None
        self.slot_frame_start = [None] * self.num_slots
        self.next_slot = 0
        self.rotated_sink_for = None
        self.rope = {}
        self.device_positions = {}


# ----------------------------------------------------------------------------- the transformer block


class AvatarBlock(WanTransformerBlock):
    """diffusers `WanTransformerBlock` (same modules, same weight names, same math) with a streaming forward.

    forward(x, text_k, text_v, temb, cos, sin, key_cache, value_cache, start, return_keys) -> (x, k):
    rotates this call's queries and keys by cos/sin, writes its keys and values at token `start` of
    key_cache/value_cache (this layer's slices of the stream cache, memory keys already rotated) and
    self-attends over the whole slices; then cross-attention to the text K/V cached at prefill and the
    feed-forward. k: this call's un-rotated keys with `return_keys` (the sink's prefill keeps them),
    else None. The cache write is the one side effect, declared to torch.compile (`attention_into`), so
    the block is one graph, shared by every layer.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # Fused self-attention QKV (`fuse_qkv`): to_q/to_k/to_v weights become views into these.
        self.register_buffer("qkv_weight", None, persistent=False)
        self.register_buffer("qkv_bias", None, persistent=False)
        self.compiled_compute: Callable | None = None

    def forward(
        self,
        x: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        temb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        start: int,
        return_keys: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.qkv_weight is not None and not torch.compiler.is_compiling():
            self._check_fused()
        compute = self.compiled_compute or AvatarBlock.compute
        return compute(self, x, text_k, text_v, temb, cos, sin, key_cache, value_cache, start, return_keys)

    def compute(
        self,
        x: torch.Tensor,
        text_k: torch.Tensor,
        text_v: torch.Tensor,
        temb: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        start: int,
        return_keys: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The block's math (diffusers `WanTransformerBlock.forward`, float32 modulation and residuals)."""
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = (
            self.scale_shift_table + temb.float()
        ).chunk(6, dim=1)
        norm = (self.norm1(x.float()) * (1 + scale_msa) + shift_msa).type_as(x)
        attn_out, k = self._self_attention(norm, cos, sin, key_cache, value_cache, start)
        x = (x.float() + attn_out * gate_msa).type_as(x)
        norm = self.norm2(x.float()).type_as(x)
        x = x + self._text_attention(norm, text_k, text_v)
        norm = (self.norm3(x.float()) * (1 + c_scale_msa) + c_shift_msa).type_as(x)
        ff = self.ffn(norm)
        x = (x.float() + ff.float() * c_gate_msa).type_as(x)
        return x, (k if return_keys else None)

    def _self_attention(self, hidden, cos, sin, key_cache, value_cache, start):
        attn = self.attn1
        if self.qkv_weight is not None:
            q, k, v = F.linear(hidden, self.qkv_weight, self.qkv_bias).chunk(3, dim=-1)
        elif isinstance(attn.to_q, Fp8Linear) and attn.to_q.gemm:  # one float8 quantisation for q, k and v
            xq = attn.to_q.quantize_input(hidden)
            q, k, v = (attn.to_q.forward_quantized(xq), attn.to_k.forward_quantized(xq),
                       attn.to_v.forward_quantized(xq))
        else:
            q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        q = attn.norm_q(q).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(k).unflatten(2, (attn.heads, -1))
        v = v.unflatten(2, (attn.heads, -1))
        dtype = kv_quant.value_dtype(key_cache, q.dtype)  # a float8 cache takes the model's dtype in
        q_rot = rotate(q, cos, sin, dtype)
        if eager_fast_path() and not kv_quant.is_packed(key_cache):  # eager: rotate keys straight into the cache
            rotate_into(key_cache[:, start : start + k.shape[1]], k, cos, sin)
            value_cache[:, start : start + v.shape[1]].copy_(v)
            out = attention(q_rot, key_cache, value_cache)
        else:
            out = attention_into(q_rot, rotate(k, cos, sin, dtype), v, key_cache, value_cache, start)
        out = out.flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out)), k

    def _text_attention(self, hidden, text_k, text_v):
        attn = self.attn2
        q = attn.norm_q(attn.to_q(hidden)).unflatten(2, (attn.heads, -1))
        out = local_attention(q, text_k.to(q.dtype), text_v.to(q.dtype)).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))

    # ---- fused QKV

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One [3*dim, dim] GEMM for q, k, v; to_q/to_k/to_v keep their names as views into it (no extra memory).

        Call after the weights are loaded and cast: a later cast or re-assignment of those parameters'
        storage (FSDP sharding too) breaks the views, which the next forward reports.
        """
        if self.qkv_weight is not None:
            return
        linears = (self.attn1.to_q, self.attn1.to_k, self.attn1.to_v)
        if any(is_sharded(p) for lin in linears for p in lin.parameters()):
            raise ValueError("--runtime.fuse_qkv: the QKV weights are sharded (per-layer sharding); "
                             "fused QKV needs whole weights, turn one of them off")
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears])
        rows = linears[0].weight.shape[0]
        for i, lin in enumerate(linears):
            lin.weight.data = weight[i * rows : (i + 1) * rows]
            lin.bias.data = bias[i * rows : (i + 1) * rows]
        self.qkv_weight, self.qkv_bias = weight, bias

    def _check_fused(self) -> None:
        if (self.attn1.to_q.weight.data_ptr() != self.qkv_weight.data_ptr()
                or self.attn1.to_v.bias.data_ptr() != self.qkv_bias[2 * self.qkv_bias.shape[0] // 3 :].data_ptr()):
            raise RuntimeError("fused QKV weights no longer share storage with to_q/to_k/to_v (cast, reloaded "
                               "or sharded after fuse_qkv); fuse again after the last change of the weights")


# Compiled graphs kept per function: (batch, frame size, memory length) combinations a process may meet.
COMPILE_RECOMPILE_LIMIT = 64
_COMPILED: dict[tuple[str, str], Callable] = {}


def _compiled_block_compute(backend: str, mode: str) -> Callable:
    """One torch.compile of `AvatarBlock.compute` per (backend, mode), shared by every block and model."""
    key = (backend, mode)
    if key not in _COMPILED:
        import torch._dynamo

        limit = max(getattr(torch._dynamo.config, "recompile_limit", 8), COMPILE_RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = limit
        torch._dynamo.config.accumulated_recompile_limit = max(
            torch._dynamo.config.accumulated_recompile_limit, 4 * limit
        )
        options = {"mode": None if mode == "default" else mode} if backend == "inductor" else {}
        _COMPILED[key] = torch.compile(
            AvatarBlock.compute, backend=backend, dynamic=False, fullgraph=True, **options
        )
    return _COMPILED[key]



# ----------------------------------------------------------------------------- the model


class AvatarDiT(nn.Module):
    """Wan2.x DiT (diffusers blocks) + S2V audio/reference/motion conditioning, streamed block-wise."""

    # Modulation and time embedding stay float32 at any weight dtype (Wan asserts float32 there).
    FP32_PARAM_MARKERS = (
        "scale_shift_table",
        "condition_embedder.time_embedder",
        "condition_embedder.time_proj",
    )
    kv_cache_dtype = "model"  # K/V storage of caches allocated from now on: model | float8 (`apply_runtime`)

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        dim, heads = cfg.dim, cfg.num_heads
        self.head_dim = dim // heads
        patch = tuple(cfg.patch_size)
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)
        self.condition_embedder = WanTimeTextImageEmbedding(
            dim=dim, time_freq_dim=cfg.freq_dim, time_proj_dim=6 * dim, text_embed_dim=cfg.text_dim
        )
        self.blocks = nn.ModuleList(
            [
                AvatarBlock(dim, cfg.ffn_dim, heads, "rms_norm_across_heads", cfg.cross_attn_norm, cfg.eps)
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm_out = FP32LayerNorm(dim, cfg.eps, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels * math.prod(patch))
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)
        # S2V conditioning (Wan2.2 model_s2v.py): pose encoder (we feed no pose: only its bias reaches the
        # tokens), token-type embedding, audio encoder + injectors, FramePack motion tokens.
        self.cond_encoder = nn.Conv3d(cfg.cond_dim, dim, kernel_size=patch, stride=patch)
        self.trainable_cond_mask = nn.Embedding(3, dim)
        self.casual_audio_encoder = CausalAudioEncoder(
            cfg.audio_dim, cfg.num_audio_layers, dim, NUM_AUDIO_TOKENS
        )
        self.audio_injector = AudioInjector(dim, heads, tuple(cfg.audio_inject_layers), cfg.eps)
        self.frame_packer = FramePackMotioner(cfg.in_channels, dim)

    # ---- dtype

    @classmethod
    def keeps_fp32(cls, param_name: str) -> bool:
        """Whether a parameter stays float32 when the model runs in bf16/fp16."""
        return any(marker in param_name for marker in cls.FP32_PARAM_MARKERS)

    def cast(self, dtype: torch.dtype) -> AvatarDiT:
        """Cast to `dtype`, keeping the modulation/time-embedding parameters float32."""
        for name, param in self.named_parameters():
            param.data = param.data.to(torch.float32 if self.keeps_fp32(name) else dtype)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    # ---- runtime options (speed only: same results within float tolerance)

    def apply_runtime(self, runtime: RuntimeConfig) -> AvatarDiT:
        """Apply `runtime.attention_backend`, `runtime.fp8`, `runtime.fuse_qkv` and `runtime.compile` (after weights
        are loaded; float8 layers may also be swapped in on the meta device before, see `quantize_fp8`)."""
        set_attention_backend(runtime.attention_backend)
        self.kv_cache_dtype = runtime.kv_cache_dtype  # caches allocated from now on
        if runtime.fp8 != "none":
            self.quantize_fp8(runtime.fp8)
        if runtime.fuse_qkv:
            self.fuse_qkv()
        if runtime.compile:
            self.compile_blocks(mode=runtime.compile_mode)
        return self

    def quantize_fp8(self, mode: str) -> int:
        """Linear layers of the blocks and audio injectors in float8 (`model/net/fp8.py`); returns how many.

        Embeddings, time/text projections, the audio encoder's final linear and the output head stay as they
        are: they are small and set the scale of everything after them; the same layers LiveAvatar's `--fp8`
        leaves out (`model.net.fp8.REFERENCE_FP8_EXCLUDED`). `auto` is tensor (the reference's) on a GPU with float8 tensor cores,
        none elsewhere (`model.net.fp8.resolve_mode`).
        """
        mode = resolve_mode(mode, self.device)
        if mode in ("gemm", "tensor") and self.device.type != "meta" and not fp8_gemm_supported(self.device):
            raise ValueError(f"--runtime.fp8 {mode}: {torch.cuda.get_device_name(self.device)} has no float8 tensor "
                             "cores (compute capability 8.9+ needed); use --runtime.fp8 weights")
        if self.is_fp8:  # already float8: switch between widening the weights and float8 GEMMs
            return switch_mode([m for m in self.modules() if isinstance(m, Fp8Linear)], mode)
        return quantize_linears([self.blocks, self.audio_injector], mode)

    @property
    def is_fp8(self) -> bool:
        return any(isinstance(m, Fp8Linear) for m in self.blocks.modules())

    def shard_units(self) -> list[nn.Module]:
        """The modules whose weights per-layer sharding gathers one at a time: blocks and audio injectors."""
        return [*self.blocks, *self.audio_injector.injector, *self.audio_injector.injector_adain_layers]

    def fuse_qkv(self) -> None:
        """Self-attention q/k/v as one GEMM in every block (`AvatarBlock.fuse_qkv`); weight names unchanged."""
        for block in self.blocks:
            block.fuse_qkv()

    def compile_blocks(self, backend: str | None = "inductor", mode: str = "default") -> None:
        """torch.compile the transformer block's math once for all layers (regional compilation).

        Every layer runs the same compiled function (`AvatarBlock.compute`, parameters are graph inputs),
        so the 40 layers cost one compilation per shape. Shapes are static: a stream meets one per
        attended length (sink + working slot, then each filled slot count) plus the sink's own pass,
        and each (batch, frame size) adds its set; the recompile limit is raised to cover that. The
        call's K/V write into the cache is inside the graph (`attention_into`); the commit copy and
        the sink's once-per-block rotation stay outside. backend None goes back to eager.
        """
        compute = None if backend is None else _compiled_block_compute(backend, mode)
        for block in self.blocks:
            block.compiled_compute = compute

    # ---- streaming API

    def new_cache(
        self, batch_size: int, device: torch.device | str, dtype: torch.dtype, motion_rope: str = MOTION_ROPE_FOLLOW
    ) -> StreamCache:
        """An empty cache for one stream; buffers are allocated by the first `prefill`.

        motion_rope "absolute": the FramePack motion tokens keep their RoPE frames of the sink pass
        (-1 .. -19) for the whole stream (LiveAvatar: `rollout_grid_sizes` never shifts the motion
        groups), so their distance to the block grows with the stream; "follow": they move with the
        window, just behind its oldest committed block.
        """
        if motion_rope not in MOTION_ROPE_MODES:
            raise ValueError(f"motion_rope must be one of {MOTION_ROPE_MODES}, got {motion_rope!r}")
        slots = self.cfg.kv_cache_blocks - 1
        return StreamCache(batch_size, torch.device(device), dtype, slots, motion_rope=motion_rope,
                           slot_frame_start=[None] * slots)

    @torch.no_grad()
    def prefill(
        self,
        cache: StreamCache,
        ref_latent: torch.Tensor,
        text_context: torch.Tensor,
        motion_latents: torch.Tensor | None = None,
    ) -> None:
        """Cache the text K/V and the sink (reference latent + FramePack motion) K/V of every layer."""
        b, c, f, h, w = ref_latent.shape
        self._check_latent_hw(h, w, "ref_latent")
        if b != cache.batch_size or c != self.cfg.in_channels or f != 1:
            raise StreamStateError(
                f"ref_latent must be [{cache.batch_size}, {self.cfg.in_channels}, 1, h, w], "
                f"got {list(ref_latent.shape)}"
            )
        if cache.ready and cache.latent_hw != (h, w):
            raise StreamStateError(
                f"ref_latent is {h}x{w} latents but this stream runs at "
                f"{cache.latent_hw[0]}x{cache.latent_hw[1]}; start a new cache for a new size"
            )
        if motion_latents is None:
            motion_latents = ref_latent.expand(-1, -1, MOTION_LATENT_FRAMES, -1, -1)
        sp = sequence_parallel()
        text_k, text_v = self._text_kv(text_context.to(self.device), b)
        ref = self.patch_embedding(ref_latent.to(self.device, self.dtype)).flatten(2).transpose(1, 2)
        motion = self.frame_packer(motion_latents.to(self.device, self.dtype))
        ref = ref + self.trainable_cond_mask.weight[COND_MASK_REF]
        motion = motion + self.trainable_cond_mask.weight[COND_MASK_MOTION]
        hp, wp = h // self.cfg.patch_size[1], w // self.cfg.patch_size[2]
        ref_pos = grid_positions([0], range(hp), range(wp))
        motion_pos = FramePackMotioner.positions(h, w)
        kind = torch.cat(
            [torch.full((len(ref_pos),), SINK_KIND_REF), torch.full((len(motion_pos),), SINK_KIND_MOTION)]
        )
        x = sp.shard_tokens(torch.cat([ref, motion], dim=1))
        positions = sp.shard_tokens(torch.cat([ref_pos, motion_pos])[None])[0]
        kind = sp.shard_tokens(kind[None])[0]
        block_pos = grid_positions(range(self.cfg.num_frames_per_block), range(hp), range(wp))
        block_pos = sp.shard_tokens(block_pos[None])[0]
        if not cache.ready:
            self._allocate(cache, x.shape[1], block_pos.shape[0], (h, w))
        cache.text_k.copy_(text_k)
        cache.text_v.copy_(text_v)
        cache.sink_positions, cache.sink_kind, cache.block_positions = positions, kind, block_pos
        # The sink's own pass places it as the reference does at the stream's start (frame_start 0),
        # which is also where the rotated sink it writes belongs: a block at frame 0 reuses it.
        tables = rotation_tables(self._sink_positions_abs(cache, 0), self.head_dim, self.device)
        _, proj = self._time_embedding(torch.zeros(b, device=self.device))
        n = cache.sink_tokens
        for layer, block in enumerate(self.blocks):
            x, k = block(x, cache.text_k[layer], cache.text_v[layer], proj, tables.cos, tables.sin,
                         cache.kv_k[layer, :, n : 2 * n], cache.kv_v[layer, :, :n], 0, return_keys=True)
            kv_quant.store(cache.kv_k[layer, :, :n], k)
        cache.rotated_sink_for = (0, REF_FRAME_OFFSET, cache.sink_positions)

    @torch.no_grad()
    def forward(
        self,
        noisy: torch.Tensor,
        timestep: torch.Tensor,
        audio: torch.Tensor,
        cache: StreamCache,
        frame_start: int,
        store_slot: bool = False,
        sink_distance: int | None = None,
    ) -> torch.Tensor:
        """Flow velocity [B,16,F,h,w] (float32) for one noisy block; reads the cache.

        With `store_slot`, this call's K/V also become the block's entry in the rolling window, as
        `commit` would write them, without commit's extra pass (the sampler's `kv_update` modes).
        `sink_distance` d puts the reference sink at frame max(30, frame_start + d) (the reference's
        per-call draw); None keeps it REF_FRAME_OFFSET frames ahead of the block.
        """
        self._check_block(cache, noisy, audio, frame_start, committing=store_slot)
        store = store_slot and cache.num_slots > 0
        hidden, temb = self._run_block(cache, noisy, timestep, audio, frame_start, commit=store,
                                       sink_distance=sink_distance)
        if store:
            self._advance_slot(cache, frame_start)
        return self._head(hidden, temb, noisy.shape)

    @torch.no_grad()
    def commit(
        self,
        cache: StreamCache,
        clean: torch.Tensor,
        audio: torch.Tensor,
        frame_start: int,
        sink_distance: int | None = None,
    ) -> None:
        """Append the clean block's K/V (timestep 0) to the rolling window, evicting the oldest block
        (`sink_distance` as in `forward`)."""
        self._check_block(cache, clean, audio, frame_start, committing=True)
        if cache.num_slots == 0:
            return
        timestep = torch.zeros(clean.shape[0], device=self.device)
        self._run_block(cache, clean, timestep, audio, frame_start, commit=True, sink_distance=sink_distance)
        self._advance_slot(cache, frame_start)

    @staticmethod
    def _advance_slot(cache: StreamCache, frame_start: int) -> None:
        """The slot just written now holds the block at `frame_start`; the next write goes to the oldest."""
        cache.slot_frame_start[cache.next_slot] = frame_start
        cache.next_slot = (cache.next_slot + 1) % cache.num_slots

    # ---- pieces

    def _run_block(
        self,
        cache: StreamCache,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        audio: torch.Tensor,
        frame_start: int,
        commit: bool,
        sink_distance: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's tokens through every layer: self-attn over sink + window + itself, text, audio."""
        sp = sequence_parallel()
        b = latents.shape[0]
        latents = latents.to(self.device, self.dtype)
        x = self.patch_embedding(latents)
        x = x + self.cond_encoder.bias.view(1, -1, 1, 1, 1)  # pose encoder of an all-zero pose map
        x = x.flatten(2).transpose(1, 2) + self.trainable_cond_mask.weight[COND_MASK_NOISY]
        x = sp.shard_tokens(x)
        timestep = torch.as_tensor(timestep, device=self.device, dtype=torch.float32).reshape(-1).expand(b)
        temb, proj = self._time_embedding(timestep)
        audio_global, audio_local = self.casual_audio_encoder(audio.to(self.device, self.dtype))
        self._rotate_sink(cache, frame_start, sink_distance)
        tables = self._block_tables(cache, frame_start)
        n = cache.sink_tokens
        span = cache.slot_start(cache.filled_slots)  # sink + working slot + filled window slots
        for layer, block in enumerate(self.blocks):
            # this layer's rotated sink, working slot and window: the call's K/V go to the working slot
            x, _ = block(x, cache.text_k[layer], cache.text_v[layer], proj, tables.cos, tables.sin,
                         cache.kv_k[layer, :, n : n + span], cache.kv_v[layer, :, :span], n)
            if layer in self.audio_injector.injected_block_id:
                full = self.audio_injector(layer, sp.gather_tokens(x), audio_global, audio_local)
                x = sp.shard_tokens(full)
        if commit:  # the working slot becomes the window's next slot (all layers, one copy each)
            work, slot, end = cache.slot_start(-1), cache.slot_start(cache.next_slot), cache.slot_start(0)
            cache.kv_k[:, :, n + slot : n + slot + cache.block_tokens] = cache.kv_k[:, :, n + work : n + end]
            cache.kv_v[:, :, slot : slot + cache.block_tokens] = cache.kv_v[:, :, work:end]
        return x, temb

    def _time_embedding(self, timestep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """temb [B, C] (head) and the 6-way block modulation [B, 6, C], float32."""
        ce = self.condition_embedder
        freq = ce.timesteps_proj(timestep.float())
        temb = ce.time_embedder(freq.to(ce.time_embedder.linear_1.weight.dtype))
        proj = ce.time_proj(ce.act_fn(temb).to(ce.time_proj.weight.dtype))
        return temb.float(), proj.float().unflatten(1, (6, -1))

    def _text_kv(self, text_context: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero-pad to text_len (as the reference), project, then K/V [L, B, text_len, H, D] per layer."""
        b, length, dim = text_context.shape
        if b != batch_size or dim != self.cfg.text_dim or length > self.cfg.text_len:
            raise StreamStateError(
                f"text_context must be [{batch_size}, <= {self.cfg.text_len}, {self.cfg.text_dim}], "
                f"got {list(text_context.shape)}"
            )
        padded = text_context.new_zeros(b, self.cfg.text_len, dim)
        padded[:, :length] = text_context
        context = self.condition_embedder.text_embedder(padded.to(self.dtype))
        ks, vs = [], []
        for block in self.blocks:
            ks.append(block.attn2.norm_k(block.attn2.to_k(context)).unflatten(2, (block.attn2.heads, -1)))
            vs.append(block.attn2.to_v(context).unflatten(2, (block.attn2.heads, -1)))
        return torch.stack(ks), torch.stack(vs)

    def _allocate(
        self, cache: StreamCache, sink_tokens: int, block_tokens: int, latent_hw: tuple[int, int]
    ) -> None:
        layers, heads = self.cfg.num_layers, self.cfg.num_heads
        values = sink_tokens + (1 + cache.num_slots) * block_tokens  # sink, working slot, window
        # runtime.kv_cache_dtype float8: keys and values packed as float8 bits + scale (model/net/kv_quant.py)
        packed = self.kv_cache_dtype == "float8"
        kv_dtype = kv_quant.PACKED_DTYPE if packed else cache.dtype
        kv_dim = kv_quant.packed_head_dim(self.head_dim) if packed else self.head_dim
        k_shape = (layers, cache.batch_size, sink_tokens + values, heads, kv_dim)  # + rotated sink
        v_shape = (layers, cache.batch_size, values, heads, kv_dim)
        text_shape = (layers, cache.batch_size, self.cfg.text_len, heads, self.head_dim)
        cache.kv_k = torch.zeros(k_shape, device=cache.device, dtype=kv_dtype)
        cache.kv_v = torch.zeros(v_shape, device=cache.device, dtype=kv_dtype)
        cache.text_k = torch.zeros(text_shape, device=cache.device, dtype=cache.dtype)
        cache.text_v = torch.zeros(text_shape, device=cache.device, dtype=cache.dtype)
        cache.sink_tokens, cache.block_tokens, cache.latent_hw = sink_tokens, block_tokens, latent_hw

    @staticmethod
    def ref_frame(frame_start: int, sink_distance: int | None = None) -> int:
        """Absolute latent frame of the reference sink for the block at `frame_start`.

        None: REF_FRAME_OFFSET frames ahead. An int d: LiveAvatar's rule, max(30, frame_start + d)
        (its `num_frames_cond_rollout = max(0, frame_start - (30 - d))` added to the ref frame 30).
        """
        if sink_distance is None:
            return frame_start + REF_FRAME_OFFSET
        if isinstance(sink_distance, bool) or not isinstance(sink_distance, int) or sink_distance < 0:
            raise StreamStateError(f"sink_distance must be a non-negative int of latent frames, got {sink_distance!r}")
        return max(REF_FRAME_OFFSET, frame_start + sink_distance)

    def _motion_frame_shift(self, cache: StreamCache, frame_start: int) -> int:
        """Frames the motion tokens are moved from their sink-pass frames for the block at `frame_start`."""
        if cache.motion_rope == MOTION_ROPE_ABSOLUTE:
            return 0
        window_frames = cache.num_slots * self.cfg.num_frames_per_block
        return frame_start - min(frame_start, window_frames)

    def _sink_positions_at(
        self, cache: StreamCache, frame_start: int, sink_distance: int | None = None
    ) -> torch.Tensor:
        """Sink positions relative to a block starting at `frame_start`.

        Reference sink: at `ref_frame`. Motion tokens: with motion_rope "absolute" at their frames of the
        sink pass (-1 .. -19), which drift ever further behind a long stream (the reference); with
        "follow" they move with the window, never further back than just behind its oldest committed block.
        """
        ref = self.ref_frame(frame_start, sink_distance) - frame_start
        motion = self._motion_frame_shift(cache, frame_start) - frame_start
        shift = torch.where(cache.sink_kind == SINK_KIND_REF, ref, motion).to(torch.float64)
        positions = cache.sink_positions.clone()
        positions[:, 0] += shift
        return positions

    def _device_positions(self, cache: StreamCache, name: str, host: torch.Tensor) -> torch.Tensor:
        """`host` (positions; kinds: 1.0 where the reference) as float64 on the model's device, copied
        once per tensor object (prefill and copy_sink bring new ones), never per block."""
        held = cache.device_positions.get(name)
        if held is None or held[0] is not host:
            device = self.device if self.device.type != "mps" else torch.device("cpu")  # MPS has no float64
            values = (host == SINK_KIND_REF) if name == "sink_kind" else host
            held = (host, values.to(device, torch.float64))
            cache.device_positions[name] = held
        return held[1]

    def _sink_positions_abs(
        self, cache: StreamCache, frame_start: int, sink_distance: int | None = None
    ) -> torch.Tensor:
        """Absolute positions (float64, on the device) of the sink for the block at `frame_start`:
        `_sink_positions_at` shifted by frame_start, computed on the device (no host copy per block).
        The sink's base positions put the reference at frame 0, so the reference frame is added whole."""
        base = self._device_positions(cache, "sink", cache.sink_positions)
        is_ref = self._device_positions(cache, "sink_kind", cache.sink_kind)
        motion = self._motion_frame_shift(cache, frame_start)
        ref = self.ref_frame(frame_start, sink_distance)
        positions = base.clone()
        positions[:, 0] += motion + (ref - motion) * is_ref
        return positions

    def _rotate_sink(self, cache: StreamCache, frame_start: int, sink_distance: int | None = None) -> None:
        """Rotate the raw sink keys for the block at `frame_start` (reference at `ref_frame`) into the
        rotated-sink region, once per layout (and after each new sink): calls with the same block and
        reference frame (denoising steps, commit) reuse it; a distance drawn per call rotates per call."""
        ref = self.ref_frame(frame_start, sink_distance)
        done = cache.rotated_sink_for
        if done is not None and done[0] == frame_start and done[1] == ref and done[2] is cache.sink_positions:
            return
        tables = rotation_tables(self._sink_positions_abs(cache, frame_start, sink_distance), self.head_dim,
                                 self.device)
        n = cache.sink_tokens
        for layer in range(cache.kv_k.shape[0]):  # per layer: a float32 temporary of one layer's sink
            if kv_quant.is_packed(cache.kv_k):  # float8: widen, rotate, round once more
                raw = kv_quant.unpack(cache.kv_k[layer, :, :n], cache.dtype)
                kv_quant.pack_into(cache.kv_k[layer, :, n : 2 * n], rotate(raw, tables.cos, tables.sin))
            elif eager_fast_path():
                rotate_into(cache.kv_k[layer, :, n : 2 * n], cache.kv_k[layer, :, :n], tables.cos, tables.sin)
            else:
                cache.kv_k[layer, :, n : 2 * n] = rotate(cache.kv_k[layer, :, :n], tables.cos, tables.sin)
        cache.rotated_sink_for = (frame_start, ref, cache.sink_positions)

    def _block_tables(self, cache: StreamCache, frame_start: int) -> RotationTables:
        """Rotation tables of the block's tokens at their absolute frames (built on the device, once per block)."""
        key = ("block", frame_start)
        tables = cache.rope.get(key)
        if tables is None:
            positions = self._device_positions(cache, "block", cache.block_positions).clone()
            positions[:, 0] += frame_start
            if len(cache.rope) >= ROPE_LAYOUTS_KEPT:
                cache.rope.pop(next(iter(cache.rope)))
            tables = rotation_tables(positions, self.head_dim, self.device)
            cache.rope[key] = tables
        return tables

    def _head(self, hidden: torch.Tensor, temb: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Modulated norm + projection, then un-patchify to [B, C, F, h, w] float32."""
        hidden = sequence_parallel().gather_tokens(hidden)
        shift, scale = (self.scale_shift_table.float() + temb[:, None]).chunk(2, dim=1)
        hidden = self.norm_out(hidden.float()) * (1 + scale) + shift
        out = self.proj_out(hidden.to(self.proj_out.weight.dtype)).float()
        b, _, f, h, w = shape
        pt, ph, pw = self.cfg.patch_size
        out = out.reshape(b, f // pt, h // ph, w // pw, pt, ph, pw, self.cfg.out_channels)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, self.cfg.out_channels, f, h, w)

    # ---- checks

    def _check_latent_hw(self, h: int, w: int, what: str) -> None:
        _, ph, pw = self.cfg.patch_size
        if h % ph or w % pw:
            raise StreamStateError(f"{what} latent size {h}x{w} must split into {ph}x{pw} patches")

    def _check_block(
        self,
        cache: StreamCache,
        latents: torch.Tensor,
        audio: torch.Tensor,
        frame_start: int,
        committing: bool,
    ) -> None:
        cfg = self.cfg
        if not cache.ready:
            raise StreamStateError(
                "the cache has no sink yet: call dit.prefill(cache, ref_latent, text) first"
            )
        b, c, f, h, w = latents.shape
        expected = [cache.batch_size, cfg.in_channels, cfg.num_frames_per_block, *cache.latent_hw]
        if [b, c, f, h, w] != expected:
            raise StreamStateError(
                f"block latents must be {expected} (B, channels, num_frames_per_block, h, w), "
                f"got {list(latents.shape)}"
            )
        audio_expected = [b, 4 * f, cfg.num_audio_layers, cfg.audio_dim]
        if list(audio.shape) != audio_expected:
            raise StreamStateError(
                f"audio must be {audio_expected} (B, 4 video frames per latent frame, "
                f"wav2vec2 layers, feature dim), got {list(audio.shape)}"
            )
        last = cache.last_committed_frame
        if frame_start < 0 or (last is not None and frame_start < last + f):
            raise StreamStateError(
                f"frame_start {frame_start} is not after the last committed block (frame {last}); "
                "blocks must be denoised and committed in stream order"
            )
