"""The streaming DiT: shapes, the bounded cache, block-wise causality, determinism, sizes."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.config import load_config
from model.net import attention as attention_seam
from model.net.audio import CausalAudioEncoder
from model.net.dit import AvatarBlock, AvatarDiT, StreamCache, StreamStateError

LATENT_HW = (16, 16)  # 128*128 video


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml").model.dit


@pytest.fixture(scope="module")
def dit(cfg) -> AvatarDiT:
    torch.manual_seed(0)
    return AvatarDiT(cfg).eval()


def _inputs(cfg, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = LATENT_HW
    ref = torch.randn(batch, 16, 1, h, w, generator=g)
    text = torch.randn(batch, 5, cfg.text_dim, generator=g)
    return ref, text


def _block(cfg, seed: int, batch: int = 1):
    g = torch.Generator().manual_seed(1000 + seed)
    h, w = LATENT_HW
    f = cfg.num_frames_per_block
    latents = torch.randn(batch, 16, f, h, w, generator=g)
    audio = torch.randn(batch, 4 * f, cfg.num_audio_layers, cfg.audio_dim, generator=g)
    return latents, audio


def _started(dit: AvatarDiT, cfg, seed: int = 0, batch: int = 1) -> StreamCache:
    cache = dit.new_cache(batch, "cpu", torch.float32)
    ref, text = _inputs(cfg, seed, batch)
    dit.prefill(cache, ref, text)
    return cache


def test_velocity_has_the_block_shape_and_is_float32(dit, cfg) -> None:
    cache = _started(dit, cfg, batch=2)
    latents, audio = _block(cfg, 0, batch=2)
    v = dit(latents, torch.tensor([1000.0, 500.0]), audio, cache, frame_start=0)
    assert v.shape == latents.shape
    assert v.dtype == torch.float32
    assert torch.isfinite(v).all()


def test_bfloat16_model_and_cache_give_float32_velocity_close_to_float32(cfg) -> None:
    torch.manual_seed(0)
    ref_model = AvatarDiT(cfg).eval()
    low = AvatarDiT(cfg).eval()
    low.load_state_dict(ref_model.state_dict())
    low.cast(torch.bfloat16)
    assert low.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert low.scale_shift_table.dtype == torch.float32  # modulation stays float32
    outs = []
    for model, dtype in ((ref_model, torch.float32), (low, torch.bfloat16)):
        cache = model.new_cache(1, "cpu", dtype)
        ref, text = _inputs(cfg, 0)
        model.prefill(cache, ref, text)
        assert cache.kv_k.dtype == dtype
        latents, audio = _block(cfg, 0)
        outs.append(model(latents, torch.tensor([700.0]), audio, cache, 0))
    assert outs[1].dtype == torch.float32
    rel = (outs[0] - outs[1]).norm() / outs[0].norm()
    assert rel < 0.05


def _stream_state(cache: StreamCache) -> tuple:
    """What a forward must leave alone: raw sink keys, sink values, the committed window, the text, the ring."""
    n = cache.sink_tokens
    return (cache.kv_k[:, :, :n].clone(), cache.kv_v[:, :, :n].clone(), cache.window_k().clone(),
            cache.window_v().clone(), cache.text_k.clone(), list(cache.slot_frame_start), cache.next_slot)


def _same_state(a: tuple, b: tuple) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[:5], b[:5])) and a[5:] == b[5:]


def test_forward_does_not_modify_the_stream_state(dit, cfg) -> None:
    """A forward writes only scratch (the working slot, the rotated sink for its block), not the stream."""
    cache = _started(dit, cfg)
    latents, audio = _block(cfg, 0)
    dit.commit(cache, latents, audio, 0)
    before = _stream_state(cache)
    latents, audio = _block(cfg, 1)
    dit(latents, torch.tensor([900.0]), audio, cache, cfg.num_frames_per_block)
    assert _same_state(_stream_state(cache), before)


def test_keys_are_stored_rotated_at_their_absolute_frames(dit, cfg) -> None:
    """Committed keys = the block's un-rotated keys rotated at frames frame_start...; the sink's raw keys
    rotated for the block being denoised sit in the rotated-sink region."""
    from model.net.rope import apply_rope, rope_tables

    f = cfg.num_frames_per_block
    cache = _started(dit, cfg)
    latents, audio = _block(cfg, 0)
    captured = {}

    def spy(block, *args):  # args: x .. start, return_keys; keep the un-rotated keys of layer 0
        x, k = AvatarBlock.compute(block, *args[:-1], True)
        captured.setdefault("k", k)
        return x, (k if args[-1] else None)

    dit.blocks[0].compiled_compute = spy
    try:
        dit.commit(cache, latents, audio, 2 * f)
    finally:
        dit.blocks[0].compiled_compute = None
    n = cache.sink_tokens
    positions = cache.block_positions.clone()
    positions[:, 0] += 2 * f
    expected = apply_rope(captured["k"], *rope_tables(positions, dit.head_dim))
    slot = cache.slot_start(0)
    torch.testing.assert_close(cache.kv_k[0, :, n + slot : n + slot + cache.block_tokens], expected,
                               atol=1e-6, rtol=1e-5)
    sink_positions = dit._sink_positions_at(cache, 2 * f)
    sink_positions[:, 0] += 2 * f
    expected_sink = apply_rope(cache.kv_k[0, :, :n], *rope_tables(sink_positions, dit.head_dim))
    torch.testing.assert_close(cache.kv_k[0, :, n : 2 * n], expected_sink, atol=1e-6, rtol=1e-5)
    assert cache.rotated_sink_for[0] == 2 * f


def test_cache_keeps_its_size_and_buffers_over_many_commits(dit, cfg) -> None:
    cache = _started(dit, cfg)
    f = cfg.num_frames_per_block
    nbytes = cache.nbytes()
    pointers = (cache.kv_k.data_ptr(), cache.kv_v.data_ptr(), cache.text_k.data_ptr())
    for block in range(12):
        latents, audio = _block(cfg, block)
        dit.commit(cache, latents, audio, block * f)
        assert cache.nbytes() == nbytes
        assert cache.filled_slots == min(block + 1, cfg.kv_cache_blocks - 1)
    assert (cache.kv_k.data_ptr(), cache.kv_v.data_ptr(), cache.text_k.data_ptr()) == pointers
    # the window holds the newest kv_cache_blocks - 1 blocks
    assert sorted(cache.slot_frame_start) == [f * b for b in range(12 - (cfg.kv_cache_blocks - 1), 12)]


def test_cache_memory_is_the_window_plus_a_rotated_sink_and_one_working_block(dit, cfg) -> None:
    cache = _started(dit, cfg)
    n, b, slots = cache.sink_tokens, cache.block_tokens, cache.num_slots
    layers, heads, head_dim = cfg.num_layers, cfg.num_heads, cfg.dim // cfg.num_heads
    assert cache.kv_v.shape == (layers, 1, n + (1 + slots) * b, heads, head_dim)
    assert cache.kv_k.shape == (layers, 1, 2 * n + (1 + slots) * b, heads, head_dim)
    window_only = 2 * (n + slots * b)  # what K + V of sink + window alone take, in tokens
    assert cache.kv_k.shape[2] + cache.kv_v.shape[2] - window_only == n + 2 * b


def test_a_block_never_sees_future_blocks(dit, cfg) -> None:
    """Two streams share blocks 0..1 and then diverge: outputs up to block 1 must be identical."""
    f = cfg.num_frames_per_block
    results = []
    for future_seed in (10, 20):
        cache = _started(dit, cfg)
        outs = []
        for block in range(4):
            latents, audio = _block(cfg, block if block < 2 else future_seed + block)
            outs.append(dit(latents, torch.tensor([600.0]), audio, cache, block * f))
            dit.commit(cache, latents, audio, block * f)
        results.append(outs)
    for block in range(2):
        assert torch.equal(results[0][block], results[1][block])
    assert not torch.allclose(results[0][3], results[1][3])


def test_past_blocks_and_audio_change_the_output(dit, cfg) -> None:
    f = cfg.num_frames_per_block
    latents, audio = _block(cfg, 5)
    fresh = _started(dit, cfg)
    with_past = _started(dit, cfg)
    past_latents, past_audio = _block(cfg, 6)
    dit.commit(with_past, past_latents, past_audio, 0)
    t = torch.tensor([500.0])
    base = dit(latents, t, audio, fresh, f)
    assert not torch.allclose(base, dit(latents, t, audio, with_past, f))
    assert not torch.allclose(base, dit(latents, t, torch.randn_like(audio), fresh, f))


def test_output_depends_only_on_relative_positions_so_streams_can_run_forever(dit, cfg) -> None:
    """Same window content at frames 21..29 or 9021..9029, same velocity: positions stay bounded."""
    f = cfg.num_frames_per_block
    outs = []
    for offset in (30, 9030):
        cache = _started(dit, cfg)
        for i, block in enumerate(range(offset // f - cfg.kv_cache_blocks + 1, offset // f)):
            latents, audio = _block(cfg, i)
            dit.commit(cache, latents, audio, block * f)
        latents, audio = _block(cfg, 99)
        outs.append(dit(latents, torch.tensor([400.0]), audio, cache, offset))
    torch.testing.assert_close(outs[0], outs[1], atol=2e-5, rtol=1e-4)


def test_same_seed_same_weights_same_output(cfg) -> None:
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = AvatarDiT(cfg).eval()
        cache = _started(model, cfg)
        latents, audio = _block(cfg, 3)
        outs.append(model(latents, torch.tensor([800.0]), audio, cache, 0))
    assert torch.equal(outs[0], outs[1])


def test_calls_out_of_stream_order_are_refused(dit, cfg) -> None:
    f = cfg.num_frames_per_block
    cache = dit.new_cache(1, "cpu", torch.float32)
    latents, audio = _block(cfg, 0)
    with pytest.raises(StreamStateError, match="prefill"):
        dit(latents, torch.tensor([1000.0]), audio, cache, 0)
    ref, text = _inputs(cfg, 0)
    dit.prefill(cache, ref, text)
    dit.commit(cache, latents, audio, 3 * f)
    with pytest.raises(StreamStateError, match="not after the last committed block"):
        dit(latents, torch.tensor([1000.0]), audio, cache, 3 * f)
    with pytest.raises(StreamStateError, match="audio must be"):
        dit(latents, torch.tensor([1000.0]), audio[:, :-1], cache, 4 * f)
    with pytest.raises(StreamStateError, match="block latents must be"):
        dit(latents[:, :, :1], torch.tensor([1000.0]), audio, cache, 4 * f)


def test_prefill_again_replaces_the_sink_and_keeps_the_window(dit, cfg) -> None:
    cache = _started(dit, cfg)
    latents, audio = _block(cfg, 0)
    dit.commit(cache, latents, audio, 0)
    window = cache.window_k().clone(), cache.window_v().clone()
    sink = cache.kv_k[:, :, : cache.sink_tokens].clone()
    ref, text = _inputs(cfg, 7)
    motion = torch.randn(1, 16, 12, *LATENT_HW)
    dit.prefill(cache, ref, text, motion_latents=motion)
    assert torch.equal(cache.window_k(), window[0]) and torch.equal(cache.window_v(), window[1])
    assert not torch.equal(cache.kv_k[:, :, : cache.sink_tokens], sink)
    assert cache.slot_frame_start[0] == 0


def test_every_self_attention_goes_through_the_sequence_parallel_seam(dit, cfg) -> None:
    calls = []

    class CountingGroup:
        def shard_tokens(self, x, dim=1):
            return x

        def gather_tokens(self, x, dim=1):
            return x

        def attention(self, q, k, v, attend):
            calls.append((q.shape[1], k.shape[1]))
            return attend(q, k, v)

    previous = attention_seam.set_sequence_parallel(CountingGroup())
    try:
        cache = _started(dit, cfg)
        assert len(calls) == cfg.num_layers  # sink prefill
        latents, audio = _block(cfg, 0)
        dit(latents, torch.tensor([1000.0]), audio, cache, 0)
        dit.commit(cache, latents, audio, 0)
        assert len(calls) == 3 * cfg.num_layers
        block_tokens = cache.block_tokens
        assert calls[-1] == (block_tokens, cache.sink_tokens + block_tokens)
    finally:
        attention_seam.set_sequence_parallel(previous)


def test_short_audio_prefix_equals_the_reference_73_frame_prefix(cfg) -> None:
    torch.manual_seed(0)
    encoder = CausalAudioEncoder(cfg.audio_dim, cfg.num_audio_layers, cfg.dim)
    audio = torch.randn(2, 12, cfg.num_audio_layers, cfg.audio_dim)
    short = encoder(audio)
    long = encoder(audio, prefix_frames=73, drop_latents=19)  # Wan2.2: motion_frames [73, 19]
    for a, b in zip(short, long):
        assert a.shape[1] == 3
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_14b_config_builds_on_meta_with_wan_sizes() -> None:
    cfg14 = load_config("configs/liveavatar_14b.yaml").model.dit
    with torch.device("meta"):
        model = AvatarDiT(cfg14)
    counts: dict[str, int] = {}
    for name, param in model.named_parameters():
        top = name.split(".")[0]
        counts[top] = counts.get(top, 0) + param.numel()
    total = sum(counts.values())
    backbone = sum(
        counts[k]
        for k in ("patch_embedding", "condition_embedder", "blocks", "proj_out", "scale_shift_table")
    )
    assert backbone == pytest.approx(14.29e9, rel=0.005)  # the Wan2.1/2.2 14B backbone
    assert counts["audio_injector"] == pytest.approx(1.888e9, rel=0.005)  # 12 injectors (cross-attn + AdaLN)
    assert total == pytest.approx(16.30e9, rel=0.005)  # Wan2.2-S2V-14B with its S2V parts
    assert len(model.blocks) == 40 and model.blocks[0].attn1.heads == 40


def test_head_dim_tables_cover_wan_split(cfg) -> None:
    from model.net.rope import rope_split

    assert rope_split(128) == (44, 42, 42)  # Wan 14B head dim 128: rope_params(1024, d - 4*(d//6)) etc.
    small = dataclasses.replace(cfg)
    assert sum(rope_split(small.dim // small.num_heads)) == small.dim // small.num_heads


def _window_then_block(model: AvatarDiT, cfg, offset: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Velocity of a block at frame `offset` after the same full window of committed blocks before it."""
    f = cfg.num_frames_per_block
    cache = model.new_cache(1, "cpu", dtype)
    ref, text = _inputs(cfg, 0)
    model.prefill(cache, ref, text)
    for i, block in enumerate(range(offset // f - cfg.kv_cache_blocks + 1, offset // f)):
        latents, audio = _block(cfg, i)
        model.commit(cache, latents, audio, block * f)
    latents, audio = _block(cfg, 99)
    return model(latents, torch.tensor([400.0]), audio, cache, offset)


LONG_STREAM_FRAME = 1_000_002  # latent frame of a block ~17 hours into a stream (4 video frames each, 16 fps)


def test_a_block_hours_into_the_stream_gives_the_output_at_its_start(dit, cfg) -> None:
    """Keys are rotated at absolute frames near 10^6: float64 angles keep the output that of frame 30."""
    near = _window_then_block(dit, cfg, 30)
    far = _window_then_block(dit, cfg, LONG_STREAM_FRAME)
    torch.testing.assert_close(far, near, atol=2e-5, rtol=1e-4)


def test_bfloat16_streams_do_not_drift_with_stream_length(cfg) -> None:
    """In bf16 (weights and cache) the distance to the float32 output stays that of bf16 rounding at
    frame 30, frame 9030 and frame ~10^6: absolute rotation adds no error that grows with the frame index."""
    torch.manual_seed(0)
    exact = AvatarDiT(cfg).eval()
    low = AvatarDiT(cfg).eval()
    low.load_state_dict(exact.state_dict())
    low.cast(torch.bfloat16)
    reference = _window_then_block(exact, cfg, 30)
    errors = []
    for offset in (30, 9030, LONG_STREAM_FRAME):
        out = _window_then_block(low, cfg, offset, torch.bfloat16)
        errors.append(float((out - reference).norm() / reference.norm()))
        torch.testing.assert_close(out, _window_then_block(low, cfg, 30, torch.bfloat16), atol=2e-2, rtol=1e-2)
    assert errors[0] < 0.05
    assert max(errors) < 1.2 * errors[0], errors


# ----------------------------------------------------------------------------- reference sink distance, motion RoPE


def test_sink_distance_puts_the_reference_at_max_30_or_block_plus_distance(dit, cfg) -> None:
    """LiveAvatar: ref frame = 30 + max(0, frame_start - (30 - d)) = max(30, frame_start + d)."""
    assert AvatarDiT.ref_frame(0, None) == 30 and AvatarDiT.ref_frame(12, None) == 42
    assert [AvatarDiT.ref_frame(0, d) for d in (4, 17, 30)] == [30, 30, 30]
    assert [AvatarDiT.ref_frame(27, d) for d in (3, 4, 30)] == [30, 31, 57]
    with pytest.raises(StreamStateError, match="sink_distance"):
        AvatarDiT.ref_frame(3, -1)
    cache = _started(dit, cfg)
    sink = dit._sink_positions_abs(cache, 27, sink_distance=10)
    ref_rows = cache.sink_kind == 0
    assert torch.equal(sink[ref_rows, 0], torch.full((int(ref_rows.sum()),), 37.0, dtype=torch.float64))
    assert torch.equal(sink[~ref_rows, 0], cache.sink_positions[~ref_rows, 0] + 27 - 9)  # follow: window of 9


def test_sink_distance_changes_the_output_only_where_it_moves_the_reference(dit, cfg) -> None:
    f = cfg.num_frames_per_block
    t = torch.tensor([700.0])
    latents, audio = _block(cfg, 1)
    cache = _started(dit, cfg)
    plain = dit(latents, t, audio, cache, 0)
    for d in (4, 30):  # block at frame 0: every distance keeps the reference at 30
        torch.testing.assert_close(dit(latents, t, audio, cache, 0, sink_distance=d), plain, rtol=0, atol=0)
    later = _started(dit, cfg)
    dit.commit(later, latents, audio, 9 * f)
    far = dit(latents, t, audio, later, 10 * f)  # reference at 60
    assert torch.equal(dit(latents, t, audio, later, 10 * f, sink_distance=30), far)
    near = dit(latents, t, audio, later, 10 * f, sink_distance=4)  # reference at 34
    assert not torch.allclose(near, far)
    assert later.rotated_sink_for[:2] == (10 * f, 34)
    # each call rotates for its own distance: the same distance again gives the same velocity
    assert torch.equal(dit(latents, t, audio, later, 10 * f, sink_distance=30), far)
    assert torch.equal(dit(latents, t, audio, later, 10 * f, sink_distance=4), near)


def test_a_drawn_distance_rotates_the_sink_once_per_new_reference_frame(dit, cfg) -> None:
    """The rotated sink is keyed on (block, reference frame): same frame reuses it, a new one redoes it."""
    f = cfg.num_frames_per_block
    cache = _started(dit, cfg)
    latents, audio = _block(cfg, 2)
    dit.commit(cache, latents, audio, 9 * f)
    rotations = []
    original = dit._sink_positions_abs

    def counted(*args, **kwargs):
        rotations.append(args[1:])
        return original(*args, **kwargs)

    dit._sink_positions_abs = counted
    try:
        for d in (5, 5, 6, None, None, 30):  # frame 30: refs 35, 35, 36, 60, 60, 60
            dit(latents, torch.tensor([300.0]), audio, cache, 10 * f, sink_distance=d)
    finally:
        del dit._sink_positions_abs
    assert len(rotations) == 3


def test_motion_rope_absolute_keeps_the_motion_tokens_at_their_sink_frames(cfg) -> None:
    """"absolute" (the reference) and "follow" agree while the window has not slid past the motion
    tokens (frame_start <= window frames) and differ after; unknown modes are refused."""
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    f = cfg.num_frames_per_block
    with pytest.raises(ValueError, match="motion_rope"):
        model.new_cache(1, "cpu", torch.float32, motion_rope="sliding")
    outs = {}
    for mode in ("absolute", "follow"):
        cache = model.new_cache(1, "cpu", torch.float32, motion_rope=mode)
        ref, text = _inputs(cfg, 0)
        model.prefill(cache, ref, text)
        motion = cache.sink_kind == 1
        if mode == "absolute":
            for start in (0, 5 * f, 1_000_002):
                positions = model._sink_positions_abs(cache, start)
                assert torch.equal(positions[motion], cache.sink_positions[motion].to(torch.float64))
        velocities = []
        for block in range(5):
            latents, audio = _block(cfg, block)
            velocities.append(model(latents, torch.tensor([500.0]), audio, cache, block * f, sink_distance=7))
            model.commit(cache, latents, audio, block * f, sink_distance=7)
        outs[mode] = velocities
    window_frames = (cfg.kv_cache_blocks - 1) * f
    for block in range(5):
        if block * f <= window_frames:
            assert torch.equal(outs["absolute"][block], outs["follow"][block])
        else:
            assert not torch.allclose(outs["absolute"][block], outs["follow"][block])
