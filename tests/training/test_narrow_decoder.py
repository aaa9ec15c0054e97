"""A narrower VAE decoder (`model.vae.decoder_base_dim`): built, streamed, trained fresh on a kept encoder, bundled."""
from __future__ import annotations

import argparse

import pytest
import torch
from safetensors.torch import load_file

from model.config import ConfigError, load_config, set_overrides
from model.vae.streaming import AvatarVAE, build_vae
from model.weights import checkpoint as weights
from model.weights.names import CheckpointError
from training import train_tiny
from training.train_tiny import (
    Trainer,
    is_encoder_side,
    read_bundle,
    read_parts,
    write_parts,
)

SHIPPED = "model/assets/tiny_avatar.safetensors"
WIDTH = 12  # neither the encoder's width (16) nor a width a bundle ships with


def trainer_args(**extra) -> argparse.Namespace:
    return train_tiny.parse_args(["--phases", "vae_stream", *[str(v) for kv in extra.items() for v in kv]])


def test_bad_widths_are_refused_naming_the_flag() -> None:
    for bad in (0, 1, -8):
        with pytest.raises(ConfigError, match="--model.vae.decoder_base_dim"):
            load_config(None, {"model.vae.decoder_base_dim": bad})
    assert load_config(None, {"model.vae.decoder_base_dim": None}).model.vae.decoder_base_dim is None
    assert load_config("configs/liveavatar_14b.yaml").model.vae.decoder_base_dim is None  # the Wan2.1 VAE as published


def test_a_narrow_decoder_streams_whole_frames_from_the_same_latents() -> None:
    cfg = load_config(None, {"model.vae.decoder_base_dim": 8})
    wide = build_vae(load_config(None, {"model.vae.decoder_base_dim": 16}).model.vae)
    narrow = build_vae(cfg.model.vae)
    assert narrow.decoder.conv_in.out_channels == 8 * 4 and wide.decoder.conv_in.out_channels == 16 * 4
    assert narrow.encoder.conv_in.out_channels == wide.encoder.conv_in.out_channels  # the DiT's latents are the same
    assert sum(p.numel() for p in narrow.decoder.parameters()) < sum(p.numel() for p in wide.decoder.parameters()) / 3
    vae = AvatarVAE(narrow)
    decoder = vae.new_decoder(torch.zeros(1, 16, 7, 8, 8), context_frames=1, restart_frames=2)
    for _ in range(3):
        video = decoder.decode(torch.randn(1, 16, 3, 8, 8))
        assert video.shape == (1, 3, 12, 64, 64) and video.abs().max() <= 1.0
    assert decoder.restarts == 4


def test_fresh_decoder_keeps_the_bundles_encoder_and_refuses_a_misfit_without_it() -> None:
    cfg = load_config(None, {"model.vae.decoder_base_dim": WIDTH})
    shipped = load_file(SHIPPED)
    trainer = Trainer(cfg, trainer_args())
    with pytest.raises(RuntimeError, match="size mismatch"):
        read_bundle(trainer, SHIPPED)  # a decoder of another width cannot be read into this one
    trainer = Trainer(cfg, trainer_args())
    before = {k: v.clone() for k, v in trainer.vae.state_dict().items() if not is_encoder_side(k)}
    read_bundle(trainer, SHIPPED, fresh_decoder=True)
    state = trainer.vae.state_dict()
    for key, value in state.items():
        if is_encoder_side(key):
            assert torch.equal(value, shipped[f"vae.{key}"]), key
        else:
            assert torch.equal(value, before[key]), key  # as built
    assert torch.equal(trainer.dit.state_dict()["proj_out.weight"], shipped["dit.proj_out.weight"])


def test_bundle_only_merges_a_new_vae_part_into_a_bundle(tmp_path) -> None:
    cfg = load_config(None, {"model.vae.decoder_base_dim": WIDTH})
    trainer = Trainer(cfg, trainer_args())
    read_bundle(trainer, SHIPPED, fresh_decoder=True)
    with torch.no_grad():
        trainer.vae.decoder.conv_out.bias.fill_(0.25)  # a trained decoder's mark
    write_parts(trainer, tmp_path / "all")
    (tmp_path / "vae_only").mkdir()
    (tmp_path / "all" / "vae.safetensors").rename(tmp_path / "vae_only" / "vae.safetensors")
    out = tmp_path / "merged.safetensors"
    assert train_tiny.main(["--bundle-only", "--init-bundle", SHIPPED, "--fresh-decoder", "--init-from",
                            str(tmp_path / "vae_only"), "--set", f"model.vae.decoder_base_dim={WIDTH}",
                            "--out", str(out)]) == 0
    merged, shipped = load_file(str(out)), load_file(SHIPPED)
    assert torch.all(merged["vae.decoder.conv_out.bias"] == 0.25)
    assert all(torch.equal(merged[k], shipped[k]) for k in shipped if k.startswith(("dit.", "audio_encoder.")))
    assert weights.bundle_config(out).model.vae.decoder_base_dim == WIDTH
    with pytest.raises(CheckpointError, match="dit.safetensors does not exist"):  # a full read needs every part
        read_parts(Trainer(cfg, trainer_args()), tmp_path / "vae_only")


def test_set_reads_values_as_flags_do_and_refuses_malformed_pairs() -> None:
    assert set_overrides(trainer_args(**{"--set": "model.vae.decoder_base_dim=8"}).set) == {
        "model.vae.decoder_base_dim": "8"}
    assert load_config(None, set_overrides(["model.vae.decoder_base_dim=8"])).model.vae.decoder_base_dim == 8
    assert load_config(None, set_overrides(["model.vae.decoder_base_dim=null"])).model.vae.decoder_base_dim is None
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        set_overrides(trainer_args(**{"--set": "model.vae.decoder_base_dim"}).set)
    with pytest.raises(ConfigError, match="unknown option"):
        train_tiny.main(["--bundle-only", "--init-from", "x", "--set", "model.vae.no_such_key=1"])


def test_the_shipped_bundle_names_its_decoder_width_and_the_prime_its_decoder_was_trained_on(caplog) -> None:
    from model.stream.avatar import AvatarModels

    shipped = weights.bundle_config(SHIPPED)
    width = shipped.model.vae.decoder_base_dim
    assert load_config(None).model.vae.decoder_base_dim == width  # configs/tiny.yaml builds what ships
    with pytest.raises(CheckpointError, match=f"--model.vae.decoder_base_dim {width}"):
        AvatarModels.load(load_config(None, {"model.vae.decoder_base_dim": WIDTH}))
    with caplog.at_level("WARNING", logger="model.stream.avatar"):
        AvatarModels.load(load_config(None))
        assert not [r for r in caplog.records if "decoder_prime" in r.getMessage()]
        AvatarModels.load(load_config(None, {"stream.scheme": "ours"}))  # primes the decoder with the reference alone
    assert [r for r in caplog.records if f"--stream.decoder_prime {shipped.stream.decoder_prime}" in r.getMessage()]
