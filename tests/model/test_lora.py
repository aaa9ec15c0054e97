"""LoRA files in LiveAvatar's published layout (peft keys), applied as its loader applies them: full tensors that
name a tensor of the peft-wrapped model replace the base weights, then the pairs merge on top; the rest is skipped
with one log line; sizes that do not fit are an error."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from model.config import load_config
from model.net.dit import AvatarDiT
from model.weights.checkpoint import (
    CheckpointError,
    load_dit,
    original_state_dict,
    original_to_ours,
    write_sharded,
)
from model.weights.lora import is_lora_target

SHARD_BYTES = 2_000_000


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml").model.dit


@pytest.fixture(scope="module")
def source(cfg) -> AvatarDiT:
    torch.manual_seed(3)
    return AvatarDiT(cfg).eval()


@pytest.fixture(scope="module")
def checkpoint(source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wan") / "Wan2.2-S2V-14B"
    write_sharded(original_state_dict(source), folder, SHARD_BYTES)
    return folder


def _rand(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_peft_targets_are_liveavatars_layers() -> None:
    for wan in ("blocks.3.self_attn.q", "blocks.0.cross_attn.o", "blocks.1.ffn.0", "blocks.1.ffn.2",
                "audio_injector.injector.0.k"):
        assert is_lora_target(wan)
    for wan in ("blocks.0.self_attn.norm_q", "blocks.0.ffn.1", "head.head", "casual_audio_encoder.encoder.final_linear"):
        assert not is_lora_target(wan)


def test_full_tensors_replace_base_weights_then_pairs_merge_and_the_rest_is_skipped_once(
        checkpoint, source, cfg, tmp_path, caplog) -> None:
    dim = cfg.dim
    weights = _rand(*source.casual_audio_encoder.weights.shape, seed=1)
    norm3 = _rand(dim, seed=2)
    k_base = _rand(dim, dim, seed=3)
    down, up = _rand(4, dim, seed=4), _rand(dim, 4, seed=5)
    q_down, q_up = _rand(4, dim, seed=6), _rand(dim, 4, seed=7)
    tensors = {  # as peft's state dict names them
        "base_model.model.blocks.1.self_attn.k.lora_A.default.weight": down,
        "base_model.model.blocks.1.self_attn.k.lora_B.default.weight": up,
        "base_model.model.blocks.1.self_attn.k.base_layer.weight": k_base,  # replaced, then merged into
        "base_model.model.blocks.0.self_attn.q.lora_A.default.weight": q_down,
        "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": q_up,
        "base_model.model.casual_audio_encoder.weights": weights,  # not a LoRA target: its own name
        "base_model.model.blocks.0.norm3.weight": norm3,  # Wan's cross-attn norm (ours: norm2)
        "base_model.model.blocks.0.self_attn.q.weight": _rand(dim, dim, seed=8),  # peft calls it base_layer: skipped
        "base_model.model.motioner.proj.weight": _rand(4, 4, seed=9),  # names nothing: skipped
    }
    path = tmp_path / "liveavatar.safetensors"
    save_file(tensors, str(path), metadata={"lora_alpha": "8"})
    with caplog.at_level(logging.INFO, logger="model.weights.lora"):
        loaded = load_dit(cfg, checkpoint, lora=path)
    scale = 8.0 / 4
    torch.testing.assert_close(loaded.casual_audio_encoder.weights, weights, rtol=0, atol=0)
    torch.testing.assert_close(loaded.blocks[0].norm2.weight, norm3, rtol=0, atol=0)
    torch.testing.assert_close(loaded.blocks[1].attn1.to_k.weight.double(),
                               k_base.double() + scale * (up.double() @ down.double()), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(loaded.blocks[0].attn1.to_q.weight.double(),  # the base weight, not the skipped one
                               source.blocks[0].attn1.to_q.weight.double() + scale * (q_up.double() @ q_down.double()),
                               atol=1e-5, rtol=1e-6)
    touched = {original_to_ours(n) for n in ("blocks.1.self_attn.k.weight", "blocks.0.self_attn.q.weight",
                                              "casual_audio_encoder.weights", "blocks.0.norm3.weight")}
    src, out = source.state_dict(), loaded.state_dict()
    assert all(torch.equal(src[k], out[k]) for k in src if k not in touched)
    skipped = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 1 and "2 keys name no tensor" in skipped[0].getMessage()
    assert "blocks.0.self_attn.q.weight" in skipped[0].getMessage()
    assert any("3 full tensors replace base weights, 2 LoRA pairs merged (alpha/rank 2)" in r.getMessage()
               for r in caplog.records)


def test_prefix_added_when_the_first_key_lacks_it_as_the_reference_does(checkpoint, source, cfg, tmp_path) -> None:
    norm3 = _rand(cfg.dim, seed=10)
    down, up = _rand(2, cfg.dim, seed=11), _rand(cfg.dim, 2, seed=12)
    bare = tmp_path / "bare.safetensors"
    save_file({"blocks.0.norm3.weight": norm3, "blocks.0.self_attn.v.lora_A.default.weight": down,
               "blocks.0.self_attn.v.lora_B.default.weight": up}, str(bare))
    loaded = load_dit(cfg, checkpoint, lora=bare)
    assert torch.equal(loaded.blocks[0].norm2.weight, norm3)
    # the first key decides: a prefixed file's unprefixed full tensor names nothing (load_state_dict skips it)
    mixed = tmp_path / "mixed.safetensors"
    save_file({"base_model.model.blocks.0.self_attn.v.lora_A.default.weight": down,
               "base_model.model.blocks.0.self_attn.v.lora_B.default.weight": up,
               "blocks.0.norm3.weight": norm3}, str(mixed))
    loaded = load_dit(cfg, checkpoint, lora=mixed)
    assert torch.equal(loaded.blocks[0].norm2.weight, source.blocks[0].norm2.weight)


def test_a_full_tensor_of_the_wrong_size_or_a_file_that_fits_nothing_is_one_clear_error(
        checkpoint, cfg, tmp_path) -> None:
    wrong = tmp_path / "wrong.safetensors"
    save_file({"base_model.model.blocks.0.norm3.weight": torch.ones(cfg.dim + 16)}, str(wrong))
    with pytest.raises(CheckpointError, match=r"wrong.safetensors: base_model.model.blocks.0.norm3.weight is \[144\]"):
        load_dit(cfg, checkpoint, lora=wrong)
    nothing = tmp_path / "nothing.safetensors"
    save_file({"base_model.model.unet.conv_in.weight": torch.ones(4, 4)}, str(nothing))
    with pytest.raises(CheckpointError, match=r"(?s)nothing.safetensors does not fit.*no lora_A/lora_B tensors"):
        load_dit(cfg, checkpoint, lora=nothing)
