"""Float8 attention over the packed float8 KV cache (`runtime.attention_backend fp8`, `model/net/attention_fp8.py`).

The PyTorch emulation of the kernel's arithmetic against float32 attention over the widened cache (random and
outlier-heavy inputs), the Triton kernel against the emulation under `TRITON_INTERPRET=1` on the CPU (a fresh
process), the fall-backs to SDPA with their log line, and the config value refused naming the flag."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.config import ConfigError, load_config
from model.net import attention as attention_seam
from model.net import attention_fp8, kv_quant

# Relative (Frobenius) error of the emulated kernel against float32 attention over the same widened cache:
# q rounded to e4m3 per (token, head) dominates (about 3% on random inputs, where the cache's own rounding of
# K and V costs about 5%); P.V in float8 (P rounded to e4m3) takes it to about 3.7% on random inputs (flat
# softmax: many small weights, each rounded) and adds almost nothing on outlier-heavy ones (peaked softmax).
RANDOM_TOLERANCE = 0.05
OUTLIER_TOLERANCE = 0.07


def _packed(x: torch.Tensor) -> torch.Tensor:
    cache = torch.zeros(*x.shape[:-1], kv_quant.packed_head_dim(x.shape[-1]), dtype=torch.uint8)
    kv_quant.pack_into(cache, x)
    return cache


def _inputs(kind: str, sq: int = 64, sk: int = 300, heads: int = 2, d: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, s, heads, d, generator=g) for s in (sq, sk, sk))
    if kind == "outliers":  # as bench/kv_cache_kernels.py --fp8_attention draws them
        channels = torch.randperm(d, generator=g)[:4]
        q[..., channels] *= 4  # outlier channels shared by queries and keys
        k[..., channels] *= 4
        k[:, :16] *= 3  # sink-like first tokens: large keys and values
        v[:, :16] *= 10
        v *= torch.exp(torch.randn(1, sk, heads, 1, generator=g) * 1.5)  # per-token value scales over ~2^4
    return q.to(torch.bfloat16), _packed(k), _packed(v)


def _float32_attention(q, key_cache, value_cache) -> torch.Tensor:
    k, v = kv_quant.unpack(key_cache, torch.float32), kv_quant.unpack(value_cache, torch.float32)
    return F.scaled_dot_product_attention(q.float().transpose(1, 2), k.transpose(1, 2),
                                          v.transpose(1, 2)).transpose(1, 2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("kind, tolerance", [("random", RANDOM_TOLERANCE), ("outliers", OUTLIER_TOLERANCE)])
def test_emulation_is_near_float32_attention_and_pv_in_float8_adds_little(kind, tolerance) -> None:
    q, kc, vc = _inputs(kind)
    exact = _float32_attention(q, kc, vc)
    errors = {}
    for block_n in (32, 128):
        for pv_fp8 in (True, False):
            out = attention_fp8.reference(q, kc, vc, block_n=block_n, pv_fp8=pv_fp8)
            assert out.shape == q.shape and out.dtype == torch.bfloat16
            errors[block_n, pv_fp8] = _rel(out, exact)
    assert max(errors.values()) < tolerance, errors
    for block_n in (32, 128):  # P's e4m3 rounding (V's scales folded in) adds less than q's: here at most +28%
        assert errors[block_n, True] <= 1.35 * errors[block_n, False] + 1e-3, errors
    # and it is float8-sized: bf16 attention over the same cache is far closer
    bf16 = F.scaled_dot_product_attention(
        q.transpose(1, 2), *(kv_quant.unpack(c, torch.bfloat16).transpose(1, 2) for c in (kc, vc))).transpose(1, 2)
    assert _rel(bf16, exact) < 0.01 < errors[128, True]


def test_emulation_of_exact_inputs_is_exact_attention() -> None:
    # queries, keys and values already on e4m3's grid with equal scales, attention that is one-hot: no rounding left
    d = 32
    k = torch.eye(d)[None, :, None, :] * 448.0  # key j = 448 e_j
    values = 2.0 ** (torch.arange(d) % 8)  # value j: 2^(j mod 8) in every channel (8 scales in each key tile)
    v = values[None, :, None, None].expand(1, d, 1, d).contiguous()
    q = (k * 2.0).to(torch.bfloat16)  # scores 448 * 896 / sqrt(d) apart: softmax picks key i exactly
    out = attention_fp8.reference(q, _packed(k), _packed(v), block_n=8)
    assert torch.equal(out.float()[0, :, 0, :], v[0, :, 0, :])


# ----------------------------------------------------------------------------- the kernel, interpreted


def check_kernel() -> None:
    """Run under TRITON_INTERPRET=1 (a fresh process: Triton reads it when the kernels are defined)."""
    g = torch.Generator().manual_seed(1)
    # tails on both sides (Sq, Sk not multiples of the tiles), two batch rows, a window slice of a larger cache
    b, sq, sk, heads, d = 2, 37, 70, 3, 32
    big_k = _packed(torch.randn(b, 96, heads, d, generator=g) * 3)
    big_v = _packed(torch.randn(b, 96, heads, d, generator=g) * torch.exp(torch.randn(b, 96, heads, 1, generator=g)))
    kc, vc = big_k[:, :sk], big_v[:, :sk]
    q = torch.randn(b, sq, heads, d, generator=g) * 2
    for block_m, block_n in ((16, 16), (32, 64)):
        # float32 q and output: the same arithmetic up to float32 summation order
        blocks = attention_fp8.Blocks(block_m, block_n, 4, 1, True)
        out = attention_fp8.attention(q, kc, vc, blocks)
        ref = attention_fp8.reference(q, kc, vc, block_n=block_n, pv_fp8=True)
        assert _rel(out, ref) < 1e-5, (blocks, _rel(out, ref))
        # bf16: the interpreter's float -> bf16 casts truncate where torch and the GPU round to nearest even,
        # so the kernel is within a bf16 step of the emulation there
        for pv_fp8 in (True, False):
            blocks = attention_fp8.Blocks(block_m, block_n, 4, 1, pv_fp8)
            out = attention_fp8.attention(q.to(torch.bfloat16), kc, vc, blocks)
            ref = attention_fp8.reference(q.to(torch.bfloat16), kc, vc, block_n=block_n, pv_fp8=pv_fp8)
            assert out.dtype == torch.bfloat16 and _rel(out, ref) < 1e-2, (blocks, _rel(out, ref))
    # through the seam: attention_into with the fp8 backend writes the cache, then reads it packed
    previous = attention_seam.set_attention_backend("fp8")
    try:
        key_cache, value_cache = big_k.clone(), big_v.clone()
        k_new, v_new = (torch.randn(b, 16, heads, d, generator=g).to(torch.bfloat16) for _ in range(2))
        with torch.inference_mode():
            out = attention_seam.attention_into(q.to(torch.bfloat16), k_new, v_new, key_cache[:, :sk],
                                                value_cache[:, :sk], 40)
        assert not attention_seam._fp8_fallbacks, attention_seam._fp8_fallbacks
        ref = attention_fp8.reference(q.to(torch.bfloat16), key_cache[:, :sk], value_cache[:, :sk])
        assert _rel(out, ref) < 1e-2, _rel(out, ref)
        assert torch.equal(key_cache[:, 40:56], _packed(k_new))  # the call's own tokens, rounded into the cache
    finally:
        attention_seam.set_attention_backend(previous)
    print("kernel ok")


def test_triton_kernel_matches_the_emulation_interpreted() -> None:
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    code = "from tests.model.test_attention_fp8 import check_kernel; check_kernel()"
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0 and "kernel ok" in done.stdout, done.stdout[-2000:] + done.stderr[-4000:]


# ----------------------------------------------------------------------------- fall-backs and the setting


@pytest.fixture()
def fp8_backend():
    previous = attention_seam.set_attention_backend("fp8")
    group = attention_seam.set_sequence_parallel(None)  # one process, whatever ran before
    attention_seam._fp8_fallbacks.clear()
    yield
    attention_seam.set_attention_backend(previous)
    attention_seam.set_sequence_parallel(group)
    attention_seam._fp8_fallbacks.clear()


def test_a_one_rank_group_leaves_the_attention_seam_on_its_plain_path() -> None:
    """A server on one GPU starts a one-rank group; the fp8 kernel (and the seam) must see a single process."""
    from model.parallel import group as parallel

    previous = parallel.set_current(parallel.current())  # the one-process group, as start_group makes it
    try:
        assert attention_seam.sequence_parallel() is attention_seam._SINGLE
    finally:
        parallel.set_current(previous)


def _into(key_cache, value_cache, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    with torch.inference_mode():
        return attention_seam.attention_into(q, k, v, key_cache, value_cache, 4)


class _Group:
    """A sequence-parallel group of one rank (the seam only checks that one is set)."""

    def shard_tokens(self, x, dim=1):
        return x

    def gather_tokens(self, x, dim=1):
        return x

    def attention(self, q, k, v, attend):
        return attend(q, k, v)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="the CPU takes the kernel when interpreted")
def test_fp8_backend_falls_back_to_sdpa_with_one_log_line(fp8_backend, caplog) -> None:
    packed = torch.zeros(1, 20, 2, kv_quant.packed_head_dim(16), dtype=torch.uint8)
    plain = torch.zeros(1, 20, 2, 16, dtype=torch.bfloat16)
    with caplog.at_level(logging.WARNING, logger="model.net.attention"):
        on_cpu = [_into(packed.clone(), packed.clone()) for _ in range(2)]
        bf16_cache = _into(plain.clone(), plain.clone())
        previous = attention_seam.set_sequence_parallel(_Group())
        try:
            grouped = _into(packed.clone(), packed.clone())
        finally:
            attention_seam.set_sequence_parallel(previous)
    lines = [r.getMessage() for r in caplog.records if "attention_backend fp8" in r.getMessage()]
    assert len(lines) == 3, lines  # once per reason, not per call
    assert "device is cpu" in lines[0] and "not float8" in lines[1] and "sequence-parallel" in lines[2]
    attention_seam.set_attention_backend("auto")
    assert torch.equal(on_cpu[0], _into(packed.clone(), packed.clone()))  # exactly today's widening path
    assert torch.equal(on_cpu[1], on_cpu[0]) and torch.equal(grouped, on_cpu[0])
    assert torch.equal(bf16_cache, _into(plain.clone(), plain.clone()))


def test_a_kernel_that_fails_on_its_first_call_leaves_sdpa(fp8_backend, monkeypatch, caplog) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("does not build here")

    monkeypatch.setattr(attention_fp8, "unsupported", lambda *args: None)  # as on a GPU
    monkeypatch.setattr(attention_fp8, "attention", broken)
    monkeypatch.setattr(attention_fp8, "_agrees", {})
    packed = torch.zeros(1, 20, 2, kv_quant.packed_head_dim(16), dtype=torch.uint8)
    with caplog.at_level(logging.WARNING, logger="model.net.attention"):
        out = _into(packed.clone(), packed.clone())
        again = _into(packed.clone(), packed.clone())
    assert attention_fp8._agrees == {"cpu": False}
    assert [r.getMessage() for r in caplog.records].count(
        "runtime.attention_backend fp8: the Triton kernel did not build or differs from its PyTorch emulation "
        "on cpu; using PyTorch's SDPA here") == 1
    attention_seam.set_attention_backend("auto")
    assert torch.equal(out, _into(packed.clone(), packed.clone())) and torch.equal(again, out)


def test_emulated_fp8_attention_on_the_cpu_is_the_reference(fp8_backend) -> None:
    g = torch.Generator().manual_seed(5)
    cache = [_packed(torch.randn(1, 20, 2, 16, generator=g)) for _ in range(2)]
    previous = attention_seam.emulate_fp8_attention(True)
    try:
        out = _into(*(c.clone() for c in cache))
    finally:
        attention_seam.emulate_fp8_attention(previous)
    written = [c.clone() for c in cache]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 8, 2, 16, generator=g).to(torch.bfloat16) for _ in range(3))
    kv_quant.pack_into(written[0][:, 4:12], k)
    kv_quant.pack_into(written[1][:, 4:12], v)
    assert torch.equal(out, attention_fp8.reference(q, *written, block_n=attention_fp8.CUDA_BLOCKS.block_n,
                                                    pv_fp8=attention_fp8.CUDA_BLOCKS.pv_fp8))
    assert not attention_seam._fp8_fallbacks


def test_fp8_backend_under_autograd_falls_back(fp8_backend, caplog) -> None:
    cache = torch.zeros(1, 20, 2, 16)
    q = torch.randn(1, 8, 2, 16, requires_grad=True)
    with caplog.at_level(logging.WARNING, logger="model.net.attention"):
        out = attention_seam.attention_into(q, q.detach(), q.detach(), cache, cache.clone(), 4)
    out.sum().backward()
    assert q.grad is not None
    assert any("forward-only" in r.getMessage() for r in caplog.records)


def test_attention_backend_fp8_is_a_setting_and_a_bad_value_names_the_flag() -> None:
    assert load_config("configs/tiny.yaml", {"runtime.attention_backend": "fp8"}).runtime.attention_backend == "fp8"
    with pytest.raises(ConfigError, match=r"--runtime\.attention_backend"):
        load_config("configs/tiny.yaml", {"runtime.attention_backend": "float8"})
    with pytest.raises(ValueError, match=r"--runtime\.attention_backend"):
        attention_seam.set_attention_backend("fp16")
    assert attention_fp8.Blocks.parse("128,64,8,3,bf16").pv_fp8 is False
