"""Checkpoint layouts written tiny in their real structure, loaded back bit-exact; LoRA merge; errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from model.config import load_config
from model.net.dit import AvatarDiT
from model.weights.checkpoint import (
    INDEX_NAME,
    CheckpointError,
    bundle_config,
    load_bundle,
    load_dit,
    original_state_dict,
    original_to_ours,
    ours_to_original,
    save_bundle,
    write_sharded,
)
from model.weights.published import load_published

SHARD_BYTES = 2_000_000  # several shards for the ~8 MB tiny DiT


@pytest.fixture(scope="module")
def app_cfg():
    return load_config("configs/tiny.yaml")


@pytest.fixture(scope="module")
def cfg(app_cfg):
    return app_cfg.model.dit


@pytest.fixture(scope="module")
def source(cfg) -> AvatarDiT:
    torch.manual_seed(1)
    return AvatarDiT(cfg).eval()


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_original_names_round_trip_for_every_parameter(source) -> None:
    for key in source.state_dict():
        assert original_to_ours(ours_to_original(key)) == key
    names = set(original_state_dict(source))
    for wan_name in (
        "patch_embedding.weight",
        "text_embedding.0.weight",
        "time_embedding.2.bias",
        "time_projection.1.weight",
        "head.head.weight",
        "head.modulation",
        "blocks.0.modulation",
        "blocks.0.self_attn.q.weight",
        "blocks.0.self_attn.norm_k.weight",
        "blocks.1.cross_attn.o.bias",
        "blocks.0.norm3.weight",
        "blocks.0.ffn.0.weight",
        "blocks.0.ffn.2.bias",
        "cond_encoder.weight",
        "trainable_cond_mask.weight",
        "casual_audio_encoder.weights",
        "casual_audio_encoder.encoder.conv1_local.conv.weight",
        "casual_audio_encoder.encoder.padding_tokens",
        "audio_injector.injector.0.q.weight",
        "audio_injector.injector.1.o.weight",
        "audio_injector.injector_adain_layers.0.linear.weight",
        "frame_packer.proj_4x.weight",
    ):
        assert wan_name in names, wan_name


def test_original_sharded_layout_loads_bit_exact(tmp_path, cfg, source) -> None:
    shards = write_sharded(original_state_dict(source), tmp_path / "Wan2.2-S2V-14B", SHARD_BYTES)
    assert len(shards) > 1
    assert shards[0].name == f"diffusion_pytorch_model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "Wan2.2-S2V-14B" / INDEX_NAME).read_text())
    assert index["weight_map"]["blocks.0.self_attn.q.weight"].startswith("diffusion_pytorch_model-")
    loaded = load_dit(cfg, tmp_path / "Wan2.2-S2V-14B")
    assert not any(p.is_meta for p in loaded.parameters())
    _assert_same_weights(source, loaded)


def test_diffusers_pipeline_folder_loads_bit_exact(tmp_path, cfg, source) -> None:
    write_sharded(source.state_dict(), tmp_path / "pipe" / "transformer", SHARD_BYTES)
    _assert_same_weights(source, load_dit(cfg, tmp_path / "pipe"))


def test_single_file_checkpoint_loads(tmp_path, cfg, source) -> None:
    folder = tmp_path / "single"
    folder.mkdir()
    save_file(
        {k: v.contiguous() for k, v in original_state_dict(source).items()},
        str(folder / "diffusion_pytorch_model.safetensors"),
    )
    _assert_same_weights(source, load_dit(cfg, folder))


def test_bfloat16_load_keeps_modulation_float32(tmp_path, cfg, source) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    loaded = load_dit(cfg, tmp_path / "ck", dtype=torch.bfloat16)
    assert loaded.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert loaded.blocks[0].scale_shift_table.dtype == torch.float32
    assert loaded.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[0].attn1.to_q.weight, source.blocks[0].attn1.to_q.weight.bfloat16())


def _write_lora(
    path: Path,
    rank: int,
    targets: list[tuple[str, int, int]],
    metadata: dict | None = None,
    prefix: str = "base_model.model.",
    adapter: str = ".default",
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    tensors, pairs = {}, {}
    for module, out_dim, in_dim in targets:
        down = torch.randn(rank, in_dim, generator=g)
        up = torch.randn(out_dim, rank, generator=g)
        tensors[f"{prefix}{module}.lora_A{adapter}.weight"] = down
        tensors[f"{prefix}{module}.lora_B{adapter}.weight"] = up
        pairs[module] = (down, up)
    save_file(tensors, str(path), metadata=metadata)
    return pairs


def test_lora_is_merged_as_w_plus_alpha_over_rank_b_at_a(tmp_path, cfg, source) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    dim, ffn = cfg.dim, cfg.ffn_dim
    targets = [
        ("blocks.0.self_attn.q", dim, dim),
        ("blocks.1.cross_attn.o", dim, dim),
        ("blocks.0.ffn.0", ffn, dim),
        ("blocks.1.ffn.2", dim, ffn),
        ("audio_injector.injector.0.k", dim, dim),
    ]
    rank, alpha = 4, 8.0
    pairs = _write_lora(tmp_path / "liveavatar.safetensors", rank, targets, {"lora_alpha": str(alpha)})
    merged = load_dit(cfg, tmp_path / "ck", lora=tmp_path / "liveavatar.safetensors")
    src, out = source.state_dict(), merged.state_dict()
    touched = set()
    for module, (down, up) in pairs.items():
        key = original_to_ours(module + ".weight")
        touched.add(key)
        expected = src[key].double() + alpha / rank * (up.double() @ down.double())
        torch.testing.assert_close(out[key].double(), expected, atol=1e-5, rtol=1e-6)
    for key in src:
        if key not in touched:
            assert torch.equal(src[key], out[key]), key


def test_lora_without_metadata_uses_adapter_config_alpha_and_plain_keys(tmp_path, cfg, source) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"lora_alpha": 2.0, "r": 2}))
    pairs = _write_lora(
        tmp_path / "lora.safetensors", 2, [("blocks.0.self_attn.v", cfg.dim, cfg.dim)], prefix="", adapter=""
    )
    merged = load_dit(cfg, tmp_path / "ck", lora=tmp_path / "lora.safetensors")
    down, up = pairs["blocks.0.self_attn.v"]
    expected = source.blocks[0].attn1.to_v.weight.double() + 1.0 * (up.double() @ down.double())
    torch.testing.assert_close(merged.blocks[0].attn1.to_v.weight.double(), expected, atol=1e-5, rtol=1e-6)


def test_lora_naming_unknown_layers_is_one_clear_error(tmp_path, cfg, source) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    _write_lora(tmp_path / "bad.safetensors", 2, [("blocks.99.self_attn.q", cfg.dim, cfg.dim)])
    with pytest.raises(CheckpointError, match=r"(?s)bad.safetensors does not fit.*blocks.99.self_attn.q"):
        load_dit(cfg, tmp_path / "ck", lora=tmp_path / "bad.safetensors")


def test_missing_checkpoint_folder_names_the_path(tmp_path, cfg) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_dit(cfg, tmp_path / "nowhere")


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path, cfg, source) -> None:
    tensors = original_state_dict(source)
    del tensors["blocks.1.self_attn.k.weight"]
    tensors["blocks.0.self_attn.extra.weight"] = torch.zeros(2)
    write_sharded(tensors, tmp_path / "ck", SHARD_BYTES)
    with pytest.raises(CheckpointError) as err:
        load_dit(cfg, tmp_path / "ck")
    message = str(err.value)
    assert str(tmp_path / "ck") in message and "original layout" in message
    assert "missing 1 keys" in message and "blocks.1.attn1.to_k.weight" in message
    assert "unexpected 1 keys" in message and "blocks.0.self_attn.extra.weight" in message


def test_a_checkpoint_of_another_size_reports_shapes(tmp_path, app_cfg, source) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    wider = load_config("configs/tiny.yaml", {"model.dit.ffn_dim": 256}).model.dit
    saved = load_config("configs/tiny.yaml").model.dit
    with pytest.raises(
        CheckpointError,
        match=rf"wrong shape for .*blocks.0.ffn.0.weight \[{saved.ffn_dim}, {saved.dim}\] "
        rf"\(model wants \[256, {saved.dim}\]\)",
    ):
        load_dit(wider, tmp_path / "ck")


def test_index_naming_absent_shards_is_refused(tmp_path, cfg, source) -> None:
    shards = write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match="lists shards that are not there"):
        load_dit(cfg, tmp_path / "ck")


def test_bundle_round_trips_every_module_and_the_config(tmp_path, app_cfg, cfg, source) -> None:
    torch.manual_seed(2)
    other = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    path = save_bundle(tmp_path / "tiny_avatar.safetensors", {"dit": source, "vae": other}, app_cfg)
    assert bundle_config(path) == app_cfg
    with torch.device("meta"):
        dit_empty = AvatarDiT(bundle_config(path).model.dit)
        other_empty = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    load_bundle(path, {"dit": dit_empty, "vae": other_empty})
    _assert_same_weights(source, dit_empty)
    _assert_same_weights(other, other_empty)


def test_bundle_that_does_not_fit_names_the_module_keys(tmp_path, app_cfg, source) -> None:
    path = save_bundle(tmp_path / "b.safetensors", {"dit": source, "vae": nn.Linear(8, 8)}, app_cfg)
    with pytest.raises(CheckpointError, match=r"missing 1 keys, first: \['text_encoder.weight'\]"):
        load_bundle(path, {"vae": nn.Linear(8, 8), "text_encoder": nn.Linear(4, 4, bias=False)})
    with pytest.raises(
        CheckpointError,
        match=r"wrong shape for 1 keys, first: \['vae.weight \[8, 8\] \(model wants \[8, 4\]\)",
    ):
        load_bundle(path, {"vae": nn.Linear(4, 8)})


def test_a_plain_safetensors_file_is_not_taken_for_a_bundle(tmp_path) -> None:
    save_file({"x": torch.zeros(1)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(CheckpointError, match="is not a model bundle"):
        load_bundle(tmp_path / "x.safetensors", {"x": nn.Linear(1, 1)})


def test_bundle_into_built_modules_by_keyword_keeps_their_dtype(tmp_path, app_cfg, cfg, source) -> None:
    path = save_bundle(tmp_path / "b.safetensors", {"dit": source}, app_cfg)
    built = AvatarDiT(cfg).cast(torch.bfloat16)
    load_bundle(path, dit=built)
    assert built.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert built.scale_shift_table.dtype == torch.float32
    assert torch.equal(built.blocks[0].attn1.to_q.weight, source.blocks[0].attn1.to_q.weight.bfloat16())


def test_published_folder_fills_a_built_dit_in_place_with_the_config_lora(
    tmp_path, app_cfg, cfg, source
) -> None:
    write_sharded(original_state_dict(source), tmp_path / "ck", SHARD_BYTES)
    pairs = _write_lora(
        tmp_path / "l.safetensors", 2, [("blocks.0.self_attn.q", cfg.dim, cfg.dim)], {"lora_alpha": "2"}
    )
    with_lora = load_config("configs/tiny.yaml", {"model.lora": str(tmp_path / "l.safetensors")})
    built = AvatarDiT(cfg)
    filled = load_published(tmp_path / "ck", with_lora, dit=built)  # encoders: test_weights_published.py
    assert filled == ["dit"]
    down, up = pairs["blocks.0.self_attn.q"]
    expected = source.blocks[0].attn1.to_q.weight.double() + up.double() @ down.double()
    torch.testing.assert_close(built.blocks[0].attn1.to_q.weight.double(), expected, atol=1e-5, rtol=1e-6)
    assert torch.equal(built.proj_out.weight, source.proj_out.weight)
