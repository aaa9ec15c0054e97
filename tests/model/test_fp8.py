"""Float8 linear layers (`runtime.fp8`): rounding within e4m3's precision, the same layer names, a quarter of the
float32 weight bytes, the trained tiny avatar's frames nearly unchanged, and clear refusals."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.config import ConfigError, load_config
from model.net.fp8 import FP8_MAX, Fp8Linear, quantize_linears, quantize_rows, quantize_tensor

E4M3_REL_STEP = 2.0 ** -4  # 3 mantissa bits: round-to-nearest is within half of 2^-3 of the value


def _linear(seed: int, fan_in: int = 64, fan_out: int = 48) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(fan_in, fan_out)


def test_row_scaled_rounding_is_within_e4m3_precision() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g) * torch.logspace(-3, 2, 32)[:, None]  # rows of very different sizes
    bits, scale = quantize_rows(w)
    assert bits.dtype == torch.uint8 and bits.shape == w.shape and scale.shape == (32, 1)
    back = bits.view(torch.float8_e4m3fn).float() * scale
    # each row's largest entry maps to 448 exactly; normal-range entries round within a relative half step
    assert torch.allclose(w.abs().amax(1), back.abs().amax(1), rtol=E4M3_REL_STEP)
    normal = w.abs() >= scale * 2.0 ** -6  # e4m3's smallest normal number is 2^-6
    rel = ((back - w).abs() / w.abs())[normal]
    assert rel.max() <= E4M3_REL_STEP + 1e-6
    assert (w.abs() / scale).max() <= FP8_MAX + 1e-3


@pytest.mark.parametrize("gemm", [False, True])
def test_fp8_linear_matches_the_float_layer(gemm: bool) -> None:
    linear = _linear(1)
    fp8 = Fp8Linear.from_linear(linear, gemm=gemm)
    assert [n for n, _ in fp8.named_parameters()] == ["weight", "weight_scale", "bias"]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    want, got = linear(x), fp8(x)
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = (got - want).norm() / want.norm()
    # weights only: e4m3 weights alone (~2% on random rows); gemm: activations rounded to e4m3 too
    assert rel < (0.06 if gemm else 0.04), float(rel)


def test_quantize_linears_swaps_only_shapes_the_fp8_gemm_takes() -> None:
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10), nn.Sequential(nn.Linear(16, 16)))
    assert quantize_linears([model], "weights") == 2
    assert [type(m).__name__ for m in (model[0], model[2], model[3][0])] == ["Fp8Linear", "Linear", "Fp8Linear"]
    with pytest.raises(ValueError, match="--runtime.fp8: must be one of"):
        quantize_linears([model], "int4")


def test_meta_built_layer_filled_later_equals_quantising_a_loaded_one() -> None:
    linear = _linear(3)
    with torch.device("meta"):
        on_meta = Fp8Linear.from_linear(nn.Linear(64, 48), gemm=False)
    on_meta = on_meta.to_empty(device="cpu")
    on_meta.fill(linear.weight.detach())
    on_meta.bias.data.copy_(linear.bias.detach())
    loaded = Fp8Linear.from_linear(linear, gemm=False)
    assert torch.equal(on_meta.weight, loaded.weight) and torch.equal(on_meta.weight_scale, loaded.weight_scale)


def test_tiny_dit_in_fp8_keeps_its_output_and_quarters_weight_bytes() -> None:
    from tests.model.test_kv_update import _dit_and_inputs

    dit, ref, text, audio, block = _dit_and_inputs()
    d = dit.cfg

    def run() -> torch.Tensor:
        with torch.inference_mode():
            cache = dit.new_cache(1, "cpu", torch.float32)
            dit.prefill(cache, ref, text)
            return dit(block, torch.full((1,), 500.0), audio, cache, 0)

    def block_weight_bytes() -> int:
        return sum(p.numel() * p.element_size() for n, p in dit.blocks.named_parameters() if n.endswith(".weight")
                   and p.ndim == 2)

    want, before = run(), block_weight_bytes()
    swapped = dit.quantize_fp8("weights")
    assert dit.is_fp8 and swapped == d.num_layers * 10 + len(d.audio_inject_layers) * 5  # q k v o twice + ffn 2; q k v o + adain
    got = run()
    assert block_weight_bytes() * 4 == before
    assert (got - want).norm() / want.norm() < 0.05


def test_bad_fp8_settings_are_refused_naming_the_flag() -> None:
    with pytest.raises(ConfigError,
                       match=r"--runtime.fp8: must be one of \('none', 'weights', 'gemm', 'tensor', 'auto'\)"):
        load_config(None, {"runtime.fp8": "int8"})
    with pytest.raises(ConfigError, match="--runtime.fuse_qkv: fused QKV .* --runtime.fp8 gemm"):
        load_config(None, {"runtime.fp8": "gemm", "runtime.fuse_qkv": True})


def test_trained_tiny_avatar_in_fp8_makes_nearly_the_same_frames_and_lip_sync() -> None:
    from model.stream.avatar import AvatarModels, StreamingAvatar
    from training.lip_sync_check import cut_sample, generate_frames, score_video
    from training.talking_dataset import make_sample

    results = {}
    for mode in ("none", "weights"):
        cfg = load_config(None, {"runtime.fp8": mode})
        sample = cut_sample(make_sample("heldout", 1, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz),
                            2 * cfg.video.infer_frames)
        frames = generate_frames(StreamingAvatar(AvatarModels.load(cfg), cfg), sample.reference, sample.audio)
        results[mode] = (frames, score_video(frames, sample.opening, sample.mouth_box, sample.reference))
    (base, base_score), (fp8, fp8_score) = results["none"], results["weights"]
    assert fp8.shape == base.shape == (24, 128, 128, 3)
    # measured: 1.1 grey levels apart on average over 4 clips; lip sync 0.884 both ways
    assert abs(fp8.astype(float) - base.astype(float)).mean() < 2.0
    assert abs(fp8_score.lip_sync.correlation_at_zero - base_score.lip_sync.correlation_at_zero) < 0.03


# ----------------------------------------------------------------------------- `tensor`: LiveAvatar's --fp8

# minimal_inference/s2v_streaming_interact.py: the ignore_keys of replace_linear_with_scaled_fp8, verbatim
LIVEAVATAR_FP8_IGNORE_KEYS = ("text_embedding", "time_embedding", "time_projection", "head.head",
                              "casual_audio_encoder.encoder.final_linear")


def _e4m3(values: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest e4m3 value (saturating at 448), from the table of all 256 codes,
    independently of the product code (exact half-way ties do not occur in these random draws)."""
    table = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    table = table[torch.isfinite(table)].unique()  # every finite e4m3 value, sorted
    idx = torch.searchsorted(table, values.clamp(-FP8_MAX, FP8_MAX)).clamp(1, len(table) - 1)
    lo, hi = table[idx - 1], table[idx]
    return torch.where((hi - values).abs() < (values - lo).abs(), hi, lo)


def _reference_fp8_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LiveAvatar's FP8LinearFunction written out in float32: per-tensor multiplier min(448/amax, 448) for the
    input and the weight, e4m3 rounding, exact product, bias, bf16 result, back to the input's dtype."""
    def quant(t):
        mult = min(FP8_MAX / max(float(t.abs().max()), 1e-12), FP8_MAX)
        return _e4m3(t.float() * mult), 1.0 / mult

    xq, sx = quant(x.reshape(-1, x.shape[-1]))
    wq, sw = quant(w)
    product = xq.double() @ wq.double().t() * (sx * sw)
    out = (product + b.double()).to(torch.bfloat16)
    return out.to(x.dtype).reshape(*x.shape[:-1], w.shape[0]), product.abs().float()


def test_per_tensor_quantisation_is_liveavatars_quant_fp8() -> None:
    g = torch.Generator().manual_seed(4)
    big = torch.randn(48, 64, generator=g) * 3.0  # max |w| > 1: the largest entry maps to 448
    small = torch.randn(48, 64, generator=g) * 0.02  # max |w| < 1: multiplier capped at 448, range not stretched
    for w in (big, small):
        bits, scale = quantize_tensor(w)
        assert bits.dtype == torch.float8_e4m3fn and scale.ndim == 0 and scale.dtype == torch.float32
        multiplier = min(FP8_MAX / float(w.abs().max()), FP8_MAX)
        assert float(scale) == pytest.approx(1.0 / multiplier, rel=1e-6)
        assert torch.equal(bits.float(), _e4m3(w * multiplier))
    assert float(quantize_tensor(big)[0].float().abs().max()) == FP8_MAX
    assert float(quantize_tensor(small)[0].float().abs().max()) < FP8_MAX / 4


def test_per_tensor_layer_computes_the_reference_fp8_linear() -> None:
    """The product path on the CPU (`torch._scaled_mm` runs there; `use_fast_accum` only changes Hopper's
    accumulation, which a GPU run alone shows) against the written-out reference, to bf16 rounding."""
    linear = _linear(5, fan_in=64, fan_out=48)
    layer = Fp8Linear.from_linear(linear, gemm=True, per_tensor=True)
    assert layer.mode == "tensor" and torch.unique(layer.weight_scale).numel() == 1
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(6)) * 5.0
    got = layer(x)
    want, product = _reference_fp8_linear(x, linear.weight.detach(), linear.bias.detach())
    assert got.dtype == x.dtype and got.shape == want.shape
    # within one bf16 step of the product and the sum: the CPU kernel rounds the product to bf16 before
    # adding the bias, cuBLAS adds it first; the operands' float8 bits are the same either way
    bf16_step = 2.0 ** -8
    assert ((got - want).abs() <= bf16_step * (product.reshape(got.shape) + want.abs()) + 1e-7).all()
    coarse = (got - linear(x)).norm() / linear(x).norm()
    fine = (Fp8Linear.from_linear(linear, gemm=True)(x) - linear(x)).norm() / linear(x).norm()
    assert 0 < fine < 0.06 and 0 < coarse < 0.1  # per-row/per-token scales are the finer quantiser here


def test_tensor_mode_converts_the_layers_liveavatar_converts() -> None:
    """Every nn.Linear of the DiT whose Wan name contains none of LiveAvatar's ignore keys, and only those."""
    from model.net.dit import AvatarDiT
    from model.weights.checkpoint import ours_to_original

    cfg = load_config(None, {"model.checkpoint": None})
    dit = AvatarDiT(cfg.model.dit).eval()
    linears = [name for name, m in dit.named_modules() if isinstance(m, nn.Linear)]
    wanted = {n for n in linears if not any(key in ours_to_original(n + ".weight") for key in LIVEAVATAR_FP8_IGNORE_KEYS)}
    left = set(linears) - wanted
    assert {ours_to_original(n + ".weight") for n in left} == {
        "text_embedding.0.weight", "text_embedding.2.weight", "time_embedding.0.weight", "time_embedding.2.weight",
        "time_projection.1.weight", "head.head.weight", "casual_audio_encoder.encoder.final_linear.weight"}
    dit.quantize_fp8("tensor")
    converted = {name for name, m in dit.named_modules() if isinstance(m, Fp8Linear)}
    assert converted == wanted
    assert all(m.per_tensor and m.gemm for m in dit.modules() if isinstance(m, Fp8Linear))


def test_tiny_dit_in_tensor_mode_stays_near_float_and_refuses_a_switch_to_row_scales() -> None:
    from tests.model.test_kv_update import _dit_and_inputs

    dit, ref, text, audio, block = _dit_and_inputs()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            cache = dit.new_cache(1, "cpu", torch.float32)
            dit.prefill(cache, ref, text)
            return dit(block, torch.full((1,), 500.0), audio, cache, 0)

    want = run()
    dit.quantize_fp8("tensor")
    got = run()
    # measured 0.0095 (gemm on the same DiT: 0.0088, weights 0.0057; BENCHMARKS.md)
    assert 0 < (got - want).norm() / want.norm() < 0.05
    with pytest.raises(ValueError, match="quantised for --runtime.fp8 tensor; reload it"):
        dit.quantize_fp8("gemm")
    assert dit.quantize_fp8("tensor") > 0  # the same mode again is a no-op


def test_trained_tiny_avatar_in_tensor_fp8_makes_nearly_the_same_frames_and_lip_sync() -> None:
    from model.stream.avatar import AvatarModels, StreamingAvatar
    from training.lip_sync_check import cut_sample, generate_frames, score_video
    from training.talking_dataset import make_sample

    results = {}
    for mode in ("none", "tensor"):
        cfg = load_config(None, {"runtime.fp8": mode})
        sample = cut_sample(make_sample("heldout", 1, cfg.video.width, cfg.video.fps, cfg.audio_sample_rate_hz),
                            2 * cfg.video.infer_frames)
        frames = generate_frames(StreamingAvatar(AvatarModels.load(cfg), cfg), sample.reference, sample.audio)
        results[mode] = (frames, score_video(frames, sample.opening, sample.mouth_box, sample.reference))
    (base, base_score), (fp8, fp8_score) = results["none"], results["tensor"]
    assert fp8.shape == base.shape
    # BENCHMARKS.md (per-tensor float8 on the tiny avatar): grey levels apart and lip sync, per mode
    assert abs(fp8.astype(float) - base.astype(float)).mean() < 3.0
    assert abs(fp8_score.lip_sync.correlation_at_zero - base_score.lip_sync.correlation_at_zero) < 0.05
