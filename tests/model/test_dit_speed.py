"""DiT speed paths give the results of the plain ones: keys rotated once into the cache (tables built on the
device once per block), the compiled block, fused QKV, the SDPA backend switch (CPU, tiny sizes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

from model.config import ConfigError, RuntimeConfig, load_config
from model.net import attention as attention_seam
from model.net import dit as dit_module
from model.net import rope
from model.net.dit import AvatarDiT

LATENT_HW = (16, 16)


# ----------------------------------------------------------------------------- reference: the plain path


def rope_tables_reference(positions: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [S, head_dim // 2] float32, angles in float64 (the DiT's original tables)."""
    positions = positions.to(torch.float64)
    angles = []
    for axis, dim in enumerate(rope.rope_split(head_dim)):
        inv_freq = 1.0 / rope.ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(positions[:, axis : axis + 1] * inv_freq[None, :])
    angle = torch.cat(angles, dim=1)
    return angle.cos().float(), angle.sin().float()


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The original rotation: float32 pairs, stacked back, cast to x's dtype."""
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2).to(x.dtype)


class ReferenceSelfAttn:
    """The original diffusers processor: rotate memory and new keys separately, cat, attend."""

    def __init__(self, cos, sin, memory_k=None, memory_v=None, memory_cos=None, memory_sin=None):
        self.cos, self.sin = cos, sin
        self.memory_k, self.memory_v, self.memory_cos, self.memory_sin = memory_k, memory_v, memory_cos, memory_sin

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        self.k, self.v = k, v
        keys, values = apply_rope_reference(k, self.cos, self.sin), v
        if self.memory_k is not None:
            past = apply_rope_reference(self.memory_k.to(k.dtype), self.memory_cos, self.memory_sin)
            keys = torch.cat([past, keys], dim=1)
            values = torch.cat([self.memory_v.to(v.dtype), values], dim=1)
        out = attention_seam.local_attention(apply_rope_reference(q, self.cos, self.sin), keys, values)
        return attn.to_out[0](out.flatten(2).type_as(q))


class ReferenceTextAttn:
    def __init__(self, text_k, text_v):
        self.text_k, self.text_v = text_k, text_v

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = attention_seam.local_attention(q, self.text_k, self.text_v)
        return attn.to_out[0](out.flatten(2).type_as(q))


# ----------------------------------------------------------------------------- fixtures and helpers


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml").model.dit


@pytest.fixture(autouse=True)
def _restore_attention_backend():
    yield
    attention_seam.set_attention_backend("auto")


def _model(cfg, seed: int = 0) -> AvatarDiT:
    torch.manual_seed(seed)
    return AvatarDiT(cfg).eval()


def _positions(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-40, 40, (n, 3), generator=g).to(torch.float64)


def _stream(model: AvatarDiT, cfg, blocks: int, dtype=torch.float32, first_frame: int = 0) -> torch.Tensor:
    """Velocities of `blocks` consecutive blocks (denoise then commit each), stacked."""
    g = torch.Generator().manual_seed(1)
    h, w = LATENT_HW
    f = cfg.num_frames_per_block
    cache = model.new_cache(1, "cpu", dtype)
    model.prefill(cache, torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g))
    outs = []
    for b in range(blocks):
        latents = torch.randn(1, 16, f, h, w, generator=g)
        audio = torch.randn(1, 4 * f, cfg.num_audio_layers, cfg.audio_dim, generator=g)
        start = first_frame + b * f
        outs.append(model(latents, torch.tensor([700.0 - 50 * b]), audio, cache, start))
        model.commit(cache, latents, audio, start)
    return torch.stack(outs)


# ----------------------------------------------------------------------------- RoPE


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotation_equals_the_reference_rope(dtype, grad) -> None:
    head_dim = 32
    positions = _positions(50, 0)
    tables = rope.rotation_tables(positions, head_dim)
    cos, sin = rope_tables_reference(positions, head_dim)
    x = torch.randn(2, 50, 3, head_dim).to(dtype)
    with torch.set_grad_enabled(grad):
        out = rope.rotate(x, tables.cos, tables.sin)
    assert out.dtype == dtype
    expected = apply_rope_reference(x, cos, sin)
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, expected, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotate_into_a_cache_slice_equals_the_reference_rope(dtype) -> None:
    head_dim = 32
    positions = _positions(24, 2)
    tables = rope.rotation_tables(positions, head_dim)
    x = torch.randn(1, 24, 4, head_dim).to(dtype)
    cache = torch.zeros(1, 40, 4, head_dim, dtype=dtype)
    with torch.no_grad():
        rope.rotate_into(cache[:, 10:34], x, tables.cos, tables.sin)
    expected = apply_rope_reference(x, *rope_tables_reference(positions, head_dim))
    atol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(cache[:, 10:34], expected, atol=atol, rtol=1e-5 if dtype == torch.float32 else 1e-2)
    assert not cache[:, :10].any() and not cache[:, 34:].any()


def test_tables_at_frame_a_million_are_float64_exact() -> None:
    """Angles near 10^6 rad: the float32 tables are the float64 ones rounded once (no float32 angle error)."""
    head_dim = 128
    positions = torch.tensor([[1_000_002.0, 7.0, 11.0], [1_000_004.0, 0.0, 3.0]], dtype=torch.float64)
    cos, sin = rope.rope_tables(positions, head_dim)
    angle = torch.cat([positions[:, a : a + 1] * (1.0 / rope.ROPE_THETA ** (
        torch.arange(0, d, 2, dtype=torch.float64) / d))[None] for a, d in enumerate(rope.rope_split(head_dim))], 1)
    torch.testing.assert_close(cos.double(), angle.cos(), atol=1e-7, rtol=0)
    torch.testing.assert_close(sin.double(), angle.sin(), atol=1e-7, rtol=0)


def test_block_equals_the_diffusers_block_with_the_reference_processors(cfg) -> None:
    """AvatarBlock's own forward = diffusers WanTransformerBlock.forward with the original processors."""
    model = _model(cfg)
    block = model.blocks[1]
    heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 48, cfg.dim, generator=g)
    temb = torch.randn(1, 6, cfg.dim, generator=g)
    text_k, text_v = torch.randn(2, 1, cfg.text_len, heads, head_dim, generator=g)
    memory_k, memory_v = torch.randn(2, 1, 80, heads, head_dim, generator=g)
    new_pos, mem_pos = _positions(48, 4), _positions(80, 5)
    new_t = rope.rotation_tables(new_pos, head_dim)
    # the cache: memory keys stored rotated at their positions, then the call's slot (48 tokens, garbage)
    key_cache = torch.cat([apply_rope_reference(memory_k, *rope_tables_reference(mem_pos, head_dim)),
                           torch.randn(1, 48, heads, head_dim, generator=g)], dim=1)
    value_cache = torch.cat([memory_v, torch.randn(1, 48, heads, head_dim, generator=g)], dim=1)
    with torch.no_grad():
        out, k = block(x, text_k, text_v, temb, new_t.cos, new_t.sin, key_cache, value_cache, 80, return_keys=True)

    reference = WanTransformerBlock(cfg.dim, cfg.ffn_dim, heads, "rms_norm_across_heads", cfg.cross_attn_norm,
                                    cfg.eps).eval()
    reference.load_state_dict(block.state_dict())
    reference.attn1.set_processor(ReferenceSelfAttn(*rope_tables_reference(new_pos, head_dim), memory_k, memory_v,
                                                    *rope_tables_reference(mem_pos, head_dim)))
    reference.attn2.set_processor(ReferenceTextAttn(text_k, text_v))
    with torch.no_grad():
        expected = reference(x, None, temb, None)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k, reference.attn1.processor.k, atol=1e-6, rtol=1e-5)  # un-rotated (the sink's)
    rotated = apply_rope_reference(reference.attn1.processor.k, *rope_tables_reference(new_pos, head_dim))
    torch.testing.assert_close(key_cache[:, 80:], rotated, atol=1e-6, rtol=1e-5)  # written rotated in the slot
    torch.testing.assert_close(value_cache[:, 80:], reference.attn1.processor.v, atol=1e-6, rtol=1e-5)


def test_rope_work_is_once_per_block_not_per_call(cfg, monkeypatch) -> None:
    """A block builds its tables and rotates the sink once, however many calls it makes; positions
    reach the device once per new sink (prefill), not per block."""
    model = _model(cfg)
    built = []
    real_tables = dit_module.rotation_tables
    monkeypatch.setattr(dit_module, "rotation_tables", lambda *a, **k: built.append(1) or real_tables(*a, **k))
    f = cfg.num_frames_per_block
    g = torch.Generator().manual_seed(0)
    h, w = LATENT_HW
    cache = model.new_cache(1, "cpu", torch.float32)
    ref, text = torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g)
    latents = torch.randn(1, 16, f, h, w, generator=g)
    audio = torch.randn(1, 4 * f, cfg.num_audio_layers, cfg.audio_dim, generator=g)
    model.prefill(cache, ref, text)
    assert len(built) == 1  # the sink's own pass
    sink_rotations = []
    monkeypatch.setattr(dit_module, "rotate_into", lambda *a: sink_rotations.append(a[0].shape) or rope.rotate_into(*a))
    for b in range(2 * cfg.kv_cache_blocks):
        built.clear()
        sink_rotations.clear()
        device_block_positions = cache.device_positions["block"][1] if b else None
        for _ in range(3):  # denoising steps
            model(latents, torch.tensor([500.0]), audio, cache, b * f)
        model.commit(cache, latents, audio, b * f)
        # block 0 reuses the sink rotated by prefill (frame 0); later blocks build block + sink tables once
        assert len(built) == (1 if b == 0 else 2)
        # the sink is rotated once (one write per layer), the calls' own keys go to the working slot
        sink_writes = [s for s in sink_rotations if s[1] == cache.sink_tokens]
        assert len(sink_writes) == (0 if b == 0 else cfg.num_layers)
        if b:
            assert cache.device_positions["block"][1] is device_block_positions


def test_block_tables_equal_tables_at_absolute_positions(cfg) -> None:
    model = _model(cfg)
    cache = model.new_cache(1, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    h, w = LATENT_HW
    model.prefill(cache, torch.randn(1, 16, 1, h, w, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g))
    for start in (0, 3, 9030, 1_000_002):
        tables = model._block_tables(cache, start)
        positions = cache.block_positions.clone()
        positions[:, 0] += start
        cos, sin = rope_tables_reference(positions, model.head_dim)
        torch.testing.assert_close(tables.cos[:, 0, ::2], cos, rtol=0, atol=0)
        torch.testing.assert_close(tables.sin[:, 0, 1::2], sin, rtol=0, atol=0)
        sink = model._sink_positions_at(cache, start)
        sink[:, 0] += start
        torch.testing.assert_close(model._sink_positions_abs(cache, start), sink, rtol=0, atol=0)


# ----------------------------------------------------------------------------- compile, fused QKV, backends


def _small(cfg, **changes):
    return dataclasses.replace(cfg, num_layers=2, audio_inject_layers=(1,), **changes)


def test_compiled_blocks_equal_eager_with_one_graph_per_shape_and_no_graph_break(cfg) -> None:
    """aot_eager traces exactly what inductor compiles (fullgraph: a graph break would raise)."""
    from torch._dynamo.utils import counters

    small = _small(cfg, kv_cache_blocks=2)
    model = _model(small)
    with torch.inference_mode():
        eager = _stream(model, small, 3)
        torch._dynamo.reset()
        counters.clear()
        model.compile_blocks(backend="aot_eager")
        compiled = _stream(model, small, 3)
    model.compile_blocks(backend=None)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)
    # shapes met: the sink's own pass, then memory = sink, sink + 1 block; every layer shares them
    assert counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]


def test_inductor_compiled_blocks_equal_eager(cfg) -> None:
    small = _small(cfg, kv_cache_blocks=1)
    model = _model(small)
    with torch.inference_mode():
        eager = _stream(model, small, 2)
        model.compile_blocks(backend="inductor")
        compiled = _stream(model, small, 2)
    model.compile_blocks(backend=None)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_explain_finds_no_graph_break_in_the_block_with_a_forced_backend(cfg) -> None:
    attention_seam.set_attention_backend("math")
    model = _model(_small(cfg))
    model.fuse_qkv()
    block = model.blocks[0]
    heads, head_dim = cfg.num_heads, cfg.dim // cfg.num_heads
    x = torch.randn(1, 48, cfg.dim)
    tables = rope.rotation_tables(_positions(48, 0), head_dim)
    args = (block, x, torch.randn(1, cfg.text_len, heads, head_dim), torch.randn(1, cfg.text_len, heads, head_dim),
            torch.randn(1, 6, cfg.dim), tables.cos, tables.sin, torch.randn(1, 64 + 48, heads, head_dim),
            torch.randn(1, 64 + 48, heads, head_dim), 64)
    with torch.inference_mode():
        explained = torch._dynamo.explain(dit_module.AvatarBlock.compute)(*args)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_fused_qkv_gives_the_same_stream_and_keeps_weight_names(cfg) -> None:
    model = _model(cfg)
    names = sorted(model.state_dict())
    with torch.inference_mode():
        plain = _stream(model, cfg, 3)
    model.fuse_qkv()
    assert sorted(model.state_dict()) == names  # the fused buffer is not part of the checkpoint
    block = model.blocks[0]
    assert block.attn1.to_k.weight.data_ptr() == block.qkv_weight[cfg.dim :].data_ptr()
    with torch.inference_mode():
        fused = _stream(model, cfg, 3)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    # published weights still load by name, into the fused storage
    other = _model(cfg, seed=1)
    model.load_state_dict(other.state_dict())
    torch.testing.assert_close(block.qkv_weight[: cfg.dim], other.blocks[0].attn1.to_q.weight)
    model.cast(torch.bfloat16)  # re-creates the parameters' storage: the fused copy would be stale
    with pytest.raises(RuntimeError, match="fuse again"):
        _stream(model, cfg, 1, dtype=torch.bfloat16)


@pytest.mark.parametrize("backend", ["flash", "cudnn", "efficient", "math"])
def test_every_attention_backend_gives_the_same_stream(cfg, backend) -> None:
    model = _model(cfg)
    with torch.inference_mode():
        auto = _stream(model, cfg, 2)
        attention_seam.set_attention_backend(backend)
        forced = _stream(model, cfg, 2)
    torch.testing.assert_close(forced, auto, atol=1e-5, rtol=1e-4)


def test_streams_far_apart_still_match_with_cached_tables_and_fused_qkv(cfg) -> None:
    model = _model(cfg)
    model.fuse_qkv()
    with torch.inference_mode():
        near = _stream(model, cfg, 6, first_frame=30)
        far = _stream(model, cfg, 6, first_frame=9030)
    torch.testing.assert_close(near, far, atol=2e-5, rtol=1e-4)


def test_apply_runtime_sets_backend_and_fusion(cfg) -> None:
    model = _model(cfg)
    model.apply_runtime(RuntimeConfig(attention_backend="math", fuse_qkv=True))
    assert attention_seam.attention_backend() == "math"
    assert all(block.qkv_weight is not None for block in model.blocks)
    assert all(block.compiled_compute is None for block in model.blocks)


@pytest.mark.parametrize(
    "key, value, flag",
    [
        ("runtime.attention_backend", "xformers", "--runtime.attention_backend"),
        ("runtime.compile_mode", "reduce-overhead", "--runtime.compile_mode"),
        ("runtime.vae_decode_chunk", "0", "--runtime.vae_decode_chunk"),
        ("compile", "maybe", "--runtime.compile"),
        ("fuse_qkv", "2", "--runtime.fuse_qkv"),
    ],
)
def test_config_rejects_bad_speed_options_naming_the_flag(key, value, flag) -> None:
    with pytest.raises(ConfigError, match=flag.replace(".", r"\.")):
        load_config("configs/tiny.yaml", {key: value})


def test_speed_options_parse_from_short_flags() -> None:
    cfg = load_config("configs/tiny.yaml", {"compile": "true", "attention_backend": "cudnn", "fuse_qkv": "on",
                                            "vae_decode_chunk": "3"})
    assert (cfg.runtime.compile, cfg.runtime.attention_backend, cfg.runtime.fuse_qkv,
            cfg.runtime.vae_decode_chunk) == (True, "cudnn", True, 3)
    from model import config

    assert config._ATTENTION_BACKENDS == attention_seam.ATTENTION_BACKENDS
