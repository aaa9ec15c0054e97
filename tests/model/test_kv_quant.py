"""Float8 KV cache (`runtime.kv_cache_dtype float8`): rounding within e4m3's precision and exact widening, the
packed layout's bytes, a block attending to its own tokens unrounded, compiled == eager, the same streams and
nearly the same frames and lip sync on the trained tiny avatar, and a refusal naming the flag."""
from __future__ import annotations

import pytest
import torch

from model.config import ConfigError, load_config
from model.net import attention as attention_seam
from model.net import kv_quant
from model.net.dit import AvatarDiT

E4M3_REL_STEP = 2.0 ** -4  # 3 mantissa bits: round-to-nearest is within half of 2^-3 of the value


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def test_packed_values_round_within_e4m3_precision_and_widen_exactly() -> None:
    # heads of very different sizes, as keys and values of different layers are
    x = _random(2, 7, 3, 16) * torch.logspace(-4, 3, 3)[None, None, :, None]
    packed = torch.zeros(2, 7, 3, kv_quant.packed_head_dim(16), dtype=torch.uint8)
    kv_quant.pack_into(packed, x)
    back = kv_quant.unpack(packed, torch.float32)
    _, scale = kv_quant.quantize(x)
    assert torch.equal(torch.frexp(scale.float()).mantissa, torch.full_like(scale.float(), 0.5))  # powers of two
    ratio = x.abs().amax(-1, keepdim=True) / scale.float()
    assert ratio.max() <= kv_quant.FP8_MAX and ratio.min() > kv_quant.FP8_MAX / 4
    normal = x.abs() >= scale.float() * 2.0 ** -6  # e4m3's smallest normal number is 2^-6
    rel = ((back - x).abs() / x.abs())[normal]
    assert rel.max() <= E4M3_REL_STEP + 1e-6
    # widening multiplies by a power of two: bf16 and float32 give the same numbers
    assert torch.equal(kv_quant.unpack(packed, torch.bfloat16).float(), back)
    zeros = torch.zeros(1, 1, 1, kv_quant.packed_head_dim(16), dtype=torch.uint8)
    kv_quant.pack_into(zeros, torch.zeros(1, 1, 1, 16))
    assert torch.equal(kv_quant.unpack(zeros, torch.float32), torch.zeros(1, 1, 1, 16))


def test_pack_into_a_token_slice_leaves_the_rest_and_refuses_a_wrong_shape() -> None:
    cache = torch.zeros(1, 10, 2, kv_quant.packed_head_dim(8), dtype=torch.uint8)
    kv_quant.pack_into(cache[:, 3:6], _random(1, 3, 2, 8))
    assert cache[:, :3].eq(0).all() and cache[:, 6:].eq(0).all() and cache[:, 3:6].ne(0).any()
    with pytest.raises(ValueError, match="cannot hold"):
        kv_quant.pack_into(cache[:, :3], _random(1, 3, 2, 16))


def test_attention_into_a_float8_cache_sees_its_own_tokens_unrounded() -> None:
    heads, d, memory, own = 2, 16, 12, 4
    cache_k = torch.zeros(1, memory + own, heads, kv_quant.packed_head_dim(d), dtype=torch.uint8)
    cache_v = torch.zeros_like(cache_k)
    kv_quant.pack_into(cache_k[:, :memory], _random(1, memory, heads, d, seed=1))
    kv_quant.pack_into(cache_v[:, :memory], _random(1, memory, heads, d, seed=2))
    q, k, v = (_random(1, own, heads, d, seed=s) for s in (3, 4, 5))
    with torch.inference_mode():
        out = attention_seam.attention_into(q, k, v, cache_k, cache_v, memory)
    keys = torch.cat([kv_quant.unpack(cache_k[:, :memory], torch.float32), k], dim=1)
    values = torch.cat([kv_quant.unpack(cache_v[:, :memory], torch.float32), v], dim=1)
    torch.testing.assert_close(out, attention_seam.local_attention(q, keys, values))
    # the call's own tokens were stored rounded for later blocks
    torch.testing.assert_close(kv_quant.unpack(cache_k[:, memory:], torch.float32), k, rtol=E4M3_REL_STEP, atol=1e-2)


def _stream(kv_cache_dtype: str, compile_backend: str | None = None, blocks: int = 5):
    """Velocities of `blocks` blocks of the tiny DiT (random weights), denoised then committed each."""
    cfg = load_config("configs/tiny.yaml").model.dit
    torch.manual_seed(0)
    model = AvatarDiT(cfg).eval()
    model.kv_cache_dtype = kv_cache_dtype
    if compile_backend:
        torch._dynamo.reset()
        model.compile_blocks(backend=compile_backend)
    g = torch.Generator().manual_seed(1)
    f = cfg.num_frames_per_block
    cache = model.new_cache(1, "cpu", torch.float32)
    outs = []
    with torch.inference_mode():
        model.prefill(cache, torch.randn(1, 16, 1, 16, 16, generator=g), torch.randn(1, 5, cfg.text_dim, generator=g))
        for b in range(blocks):  # past the window (3 slots): slots are overwritten too
            latents = torch.randn(1, 16, f, 16, 16, generator=g)
            audio = torch.randn(1, 4 * f, cfg.num_audio_layers, cfg.audio_dim, generator=g)
            outs.append(model(latents, torch.tensor([700.0 - 50 * b]), audio, cache, b * f))
            model.commit(cache, latents, audio, b * f)
    model.compile_blocks(backend=None)
    return torch.stack(outs), cache


def test_float8_cache_streams_like_the_model_dtype_in_about_a_quarter_of_the_float32_bytes() -> None:
    want, full = _stream("model")
    got, packed = _stream("float8")
    assert packed.kv_k.dtype == torch.uint8 and packed.kv_k.shape[:-1] == full.kv_k.shape[:-1]
    head_dim = full.kv_k.shape[-1]
    kv_bytes = packed.kv_k.numel() + packed.kv_v.numel()
    assert kv_bytes * 4 * head_dim == (full.kv_k.numel() + full.kv_v.numel()) * 4 * (head_dim + 2)
    assert (got - want).norm() / want.norm() < 1e-2  # measured 1.3e-4 on random weights


def test_compiled_blocks_with_a_float8_cache_equal_eager() -> None:
    eager, _ = _stream("float8", blocks=3)
    compiled, _ = _stream("float8", compile_backend="aot_eager", blocks=3)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-4)


def test_bad_kv_cache_dtype_is_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError, match=r"--runtime.kv_cache_dtype: must be one of \('model', 'float8'\)"):
        load_config(None, {"runtime.kv_cache_dtype": "int4"})


def test_trained_tiny_avatar_with_a_float8_cache_makes_nearly_the_same_frames_and_lip_sync() -> None:
    from model.stream.avatar import AvatarModels, StreamingAvatar
    from training.lip_sync_check import cut_sample, generate_frames, score_video
    from training.talking_dataset import make_sample

    results = {}
    for kv in ("model", "float8"):
        cfg = load_config(None, {"runtime.kv_cache_dtype": kv, "sampler.kv_update": "per_step"})
        sample = cut_sample(make_sample("heldout", 1, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz),
                            2 * cfg.video.infer_frames)
        frames = generate_frames(StreamingAvatar(AvatarModels.load(cfg), cfg), sample.reference, sample.audio)
        results[kv] = (frames, score_video(frames, sample.opening, sample.mouth_box, sample.reference))
    (base, base_score), (fp8, fp8_score) = results["model"], results["float8"]
    assert fp8.shape == base.shape and len(base) == 24
    # measured in BENCHMARKS.md over more clips; here 2 clips
    assert abs(fp8.astype(float) - base.astype(float)).mean() < 2.0
    assert abs(fp8_score.lip_sync.correlation_at_zero - base_score.lip_sync.correlation_at_zero) < 0.03


# ----------------------------------------------------------------------------- the one-pass Triton kernels

def check_kernels() -> None:
    """Run under TRITON_INTERPRET=1 (a fresh process: Triton reads it when the kernels are defined)."""
    import os

    from model.net import kv_quant_triton as kernels

    g = torch.Generator().manual_seed(0)
    # every e4m3 value, the midpoints between neighbours (ties to even), random values down into subnormals
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    codes = codes[codes.isfinite()].sort().values
    mids = (codes[1:] + codes[:-1]) / 2
    spread = torch.cat([torch.randn(4096, generator=g) * s for s in (1e-4, 1e-2, 1.0, 150.0)]).clamp(-448, 448)
    values = torch.cat([codes, mids, -mids, spread, torch.zeros(32 - (2 * len(mids) + len(codes)) % 32)])
    for dtype in (torch.float32, torch.bfloat16):
        for x in (values.view(-1, 1, 32), _random(3, 37, 5, 32) * torch.logspace(-5, 3, 5)[None, None, :, None]):
            x = x.to(dtype).contiguous()
            eager, fused = (torch.zeros(*x.shape[:-1], 34, dtype=torch.uint8) for _ in range(2))
            kv_quant._pack_eager(eager, x)
            kernels.pack_into(fused, x)
            assert torch.equal(fused, eager), (dtype, (fused != eager).sum())
            assert torch.equal(kernels.unpack(eager, dtype), kv_quant._unpack_eager(eager, dtype))
    # through the DiT: a stream with the kernels is bit for bit the eager stream, and the kernels were used
    os.environ["LIVEAVATAR_KV_EAGER"] = "1"
    eager_stream, _ = _stream("float8", blocks=4)
    del os.environ["LIVEAVATAR_KV_EAGER"]
    fused_stream, _ = _stream("float8", blocks=4)
    assert kv_quant._agrees == {("pack", "cpu"): True, ("unpack", "cpu"): True}, kv_quant._agrees
    assert torch.equal(fused_stream, eager_stream)
    print("kernels ok")


def test_triton_kernels_give_the_eager_bytes_and_streams() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    code = "from tests.model.test_kv_quant import check_kernels; check_kernels()"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0 and "kernels ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


# ----------------------------------------------------------------------------- under sequence parallelism

def _float8_two_blocks() -> torch.Tensor:
    """Two blocks of the tiny DiT with a float8 cache, on this process or this rank of the current group."""
    from tests.model.test_parallel import _run_two_blocks

    cfg = load_config(None)
    torch.manual_seed(0)  # the same weights on every rank
    dit = AvatarDiT(cfg.model.dit).eval()
    dit.kv_cache_dtype = "float8"
    return _run_two_blocks(dit, cfg, shard_weights=False)["out"]


def _float8_rank() -> torch.Tensor:
    from model.parallel import group as parallel

    group = parallel.start_group("cpu", num_heads=4)
    try:
        return _float8_two_blocks()
    finally:
        group.shutdown()


def test_float8_cache_under_ulysses_equals_one_process() -> None:
    """Each rank packs its own tokens (one scale per token and head), so sharding changes no bit of the cache."""
    from tests.model.group_runner import run_in_group

    expected = _float8_two_blocks()
    for out in run_in_group(_float8_rank, 2):
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
