"""The GPU group's logic on the CPU: launch checks, and Ulysses attention equal to one process (gloo)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.parallel import group as parallel
from model.parallel.group import LaunchError, pick_device_and_backend, plan_layout, read_launch_env
from tests.model.group_runner import run_in_group


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # [B, S, H, D] in and out, as the DiT's attention hook passes them
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _qkv(seed: int, q_len: int, kv_len: int, heads: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, q_len, heads, 8, generator=g), torch.randn(2, kv_len, heads, 8, generator=g),
            torch.randn(2, kv_len, heads, 8, generator=g))


def _ulysses_worker(q_len: int, kv_len: int) -> dict:
    group = parallel.start_group("cpu", num_heads=4)
    try:
        q, k, v = _qkv(0, q_len, kv_len)
        out = group.attention(group.shard_tokens(q), group.shard_tokens(k), group.shard_tokens(v), _sdpa)
        return {"out": group.gather_tokens(out), "role": group.role, "sp_rank": group.sp_rank,
                "job": group.broadcast_job({"clip": 7} if group.rank == 0 else None)}
    finally:
        group.shutdown()


@pytest.mark.parametrize("q_len,kv_len", [(16, 16), (8, 24)])
def test_two_rank_ulysses_attention_equals_one_process(q_len: int, kv_len: int) -> None:
    q, k, v = _qkv(0, q_len, kv_len)
    expected = _sdpa(q, k, v)
    results = run_in_group(_ulysses_worker, 2, q_len, kv_len)
    for r in results:
        torch.testing.assert_close(r["out"], expected, rtol=1e-5, atol=1e-5)
        assert r["job"] == {"clip": 7}
    assert [r["role"] for r in results] == [parallel.ROLE_SERVER_DIT, parallel.ROLE_DIT]
    assert [r["sp_rank"] for r in results] == [0, 1]


def test_single_process_runs_the_same_path_with_identity_exchanges() -> None:
    group = parallel.start_group("cpu", num_heads=4, env={})
    q, k, v = _qkv(1, 12, 12)
    assert group.sp_size == 1 and not group.distributed
    assert group.shard_tokens(q) is q
    torch.testing.assert_close(group.attention(q, k, v, _sdpa), _sdpa(q, k, v))


def test_ranks_not_dividing_heads_are_refused_with_the_valid_counts() -> None:
    with pytest.raises(LaunchError, match=r"3 DiT ranks do not divide the DiT's 40 attention heads.*\[1, 2, 4, 5, 8"):
        plan_layout(world_size=3, rank=0, num_heads=40, vae_rank=False)


def test_vae_rank_takes_the_last_process_and_needs_two() -> None:
    layout = plan_layout(world_size=3, rank=2, num_heads=4, vae_rank=True)
    assert (layout.sp_size, layout.vae_rank, layout.role, layout.is_dit_rank) == (2, 2, parallel.ROLE_VAE, False)
    assert plan_layout(world_size=3, rank=0, num_heads=4, vae_rank=True).role == parallel.ROLE_SERVER_DIT
    with pytest.raises(LaunchError, match="needs at least 2 processes"):
        plan_layout(world_size=1, rank=0, num_heads=4, vae_rank=True)


def test_partial_or_bad_torchrun_environment_is_refused() -> None:
    with pytest.raises(LaunchError, match=r"not \['LOCAL_RANK'\]"):
        read_launch_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="RANK=2 must be in 0..WORLD_SIZE-1"):
        read_launch_env({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(LaunchError, match="not an integer"):
        read_launch_env({"RANK": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    launch = read_launch_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (launch.rank, launch.world_size, launch.local_rank, launch.launched) == (1, 2, 1, True)


def test_gpu_launch_problems_are_refused_before_touching_nccl() -> None:
    with pytest.raises(LaunchError, match="no CUDA GPU is visible"):
        pick_device_and_backend("cuda", local_rank=0, world_size=2, cuda_count=0)
    with pytest.raises(LaunchError, match="only 2 GPU"):
        pick_device_and_backend("cuda", local_rank=3, world_size=4, cuda_count=2)
    with pytest.raises(LaunchError, match="pins one GPU"):
        pick_device_and_backend("cuda:1", local_rank=0, world_size=2, cuda_count=2)
    assert pick_device_and_backend("cpu", 0, 2) == (torch.device("cpu"), "gloo")
    assert pick_device_and_backend("cuda", 1, 2, cuda_count=2) == (torch.device("cuda", 1), "nccl")


def test_uneven_token_count_is_refused_with_advice() -> None:
    group = parallel.ParallelGroup(plan_layout(2, 0, 4, False), torch.device("cpu"), "gloo")
    with pytest.raises(LaunchError, match="7 tokens does not split over 2 DiT ranks"):
        group.shard_tokens(torch.zeros(1, 7, 4))


def _dit_two_blocks(shard_weights: bool, fp8: str = "none") -> dict:
    """Prefill, denoise and commit one block, then denoise the next: the DiT's whole streaming surface."""
    from model.config import load_config
    from model.net.dit import AvatarDiT

    cfg = load_config(None)
    group = parallel.current() if shard_weights else parallel.start_group("cpu", cfg.model.dit.num_heads, env={})
    torch.manual_seed(0)  # the same weights on every rank
    dit = AvatarDiT(cfg.model.dit).eval()
    dit.quantize_fp8(fp8)  # float8 bits are what the sharded ranks gather
    if shard_weights:
        dit = group.shard_layers(dit, list(dit.blocks) + list(dit.audio_injector.injector))
    return _run_two_blocks(dit, cfg, shard_weights)


def _run_two_blocks(dit, cfg, shard_weights: bool) -> dict:
    d = cfg.model.dit
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, d.in_channels, 1, 16, 16, generator=g)
    text = torch.randn(1, 5, d.text_dim, generator=g)
    audio = torch.randn(1, 4 * d.num_frames_per_block, d.num_audio_layers, d.audio_dim, generator=g)
    blocks = [torch.randn(1, d.in_channels, d.num_frames_per_block, 16, 16, generator=g) for _ in range(2)]
    t = torch.full((1,), 500.0)
    with torch.inference_mode():
        cache = dit.new_cache(1, "cpu", torch.float32)
        dit.prefill(cache, ref, text)
        first = dit(blocks[0], t, audio, cache, 0)
        dit.commit(cache, blocks[0], audio, 0)
        second = dit(blocks[1], t, audio, cache, d.num_frames_per_block)
    matrices = [p for name, p in dit.blocks[0].ffn.named_parameters() if name.endswith(".weight")]
    shard_rows = [p.to_local().shape[0] for p in matrices] if shard_weights else []
    full_rows = [p.shape[0] for p in matrices]
    return {"out": torch.cat([first, second], dim=2), "shard_rows": shard_rows, "full_rows": full_rows}


def _sharded_worker(fp8: str = "none") -> dict:
    group = parallel.start_group("cpu", num_heads=4)
    try:
        return _dit_two_blocks(shard_weights=True, fp8=fp8)
    finally:
        group.shutdown()


@pytest.mark.parametrize("fp8", ["none", "weights"])
def test_per_layer_sharded_weights_with_ulysses_equal_one_process(fp8: str) -> None:
    expected = _dit_two_blocks(shard_weights=False, fp8=fp8)["out"]
    for r in run_in_group(_sharded_worker, 2, fp8):
        torch.testing.assert_close(r["out"], expected, rtol=1e-4, atol=1e-4)
        # each rank keeps half the rows of every weight matrix of a block, not the whole layer
        assert r["shard_rows"] == [rows // 2 for rows in r["full_rows"]]


def _loaded_two_blocks(shard_weights: bool, fp8: str) -> dict:
    """The shipped tiny bundle through the normal loader (`AvatarModels.load`), sharded or whole."""
    from model.config import load_config
    from model.stream.avatar import AvatarModels

    cfg = load_config(None, {"parallel.shard_weights": shard_weights, "runtime.fp8": fp8})
    group = parallel.current() if shard_weights else parallel.start_group("cpu", cfg.model.dit.num_heads, env={})
    dit = AvatarModels.load(cfg).dit
    assert any(hasattr(p, "to_local") for p in dit.blocks[0].parameters()) == (shard_weights and group.sp_size > 1)
    return _run_two_blocks(dit, cfg, shard_weights)


def _loaded_sharded_worker(fp8: str) -> dict:
    group = parallel.start_group("cpu", num_heads=4)
    try:
        return _loaded_two_blocks(shard_weights=True, fp8=fp8)
    finally:
        group.shutdown()


@pytest.mark.parametrize("fp8", ["weights"])  # bf16/float32 sharded loading: tests/model/test_group_sessions.py
def test_server_loader_shards_the_trained_bundle_over_two_ranks_and_matches_one_process(fp8: str) -> None:
    # parallel.shard_weights: the checkpoint is read one tensor at a time into each rank's rows, into float8 layers
    expected = _loaded_two_blocks(shard_weights=False, fp8=fp8)["out"]
    for r in run_in_group(_loaded_sharded_worker, 2, fp8):
        torch.testing.assert_close(r["out"], expected, rtol=1e-4, atol=1e-4)
        assert r["shard_rows"] == [rows // 2 for rows in r["full_rows"]]


def test_sharded_weights_refuse_layouts_that_cannot_hold_them() -> None:
    from model.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="--parallel.shard_weights: per-layer sharding splits"):
        load_config(None, {"parallel.shard_weights": True, "parallel.mode": "tpp", "sampler.kv_update": "per_step"})
    with pytest.raises(ConfigError, match="--parallel.shard_weights: the VAE rank holds no DiT shard"):
        load_config(None, {"parallel.shard_weights": True, "parallel.vae_rank": True})


def test_a_size_whose_tokens_do_not_split_is_refused_at_launch() -> None:
    from model.config import load_config

    cfg = load_config("configs/liveavatar_14b.yaml")
    parallel.check_token_split(cfg, 8)  # 704x384: 3168 block and 2640 sink tokens split over 1, 2, 4, 8
    with pytest.raises(LaunchError, match=r"do not split over 5 DiT ranks; use a DiT rank count in \[1, 2, 4, 8\]"):
        parallel.check_token_split(cfg, 5)
