"""A whole Wan2.2-S2V-14B folder, written tiny in the published layout and names, loads end to end bit-exact.

The folder is made from the tiny modules' own weights converted to the ORIGINAL names (the inverse maps):
DiT shards + index (Wan2.2 names), Wan2.1_VAE.pth (Wan VAE names), models_t5_umt5-xxl-enc-bf16.pth (Wan T5
names, bf16), google/umt5-xxl/ (a tiny T5 tokenizer trained here, no download) and
wav2vec2-large-xlsr-53-english/ (a Wav2Vec2ForCTC saved with save_pretrained), plus a LiveAvatar-style LoRA.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import UMT5EncoderModel, Wav2Vec2ForCTC, Wav2Vec2Model

from model.config import load_config
from model.encoders.audio import wav2vec2_config
from model.encoders.text import PretrainedTokenizer, umt5_config
from model.io_types import AudioWindow
from model.net.dit import AvatarDiT
from model.stream.avatar import AvatarModels, StreamingAvatar
from model.vae.streaming import build_vae
from model.weights.checkpoint import (
    CheckpointError,
    load_dit,
    original_state_dict,
    ours_to_diffusers,
    write_sharded,
)
from model.weights.encoders import (
    T5_FILE,
    VAE_FILE,
    WAV2VEC2_DIR,
    diffusers_vae_to_wan,
    transformers_t5_to_wan,
)

SIZE = "64*64"
SHARD_BYTES = 2_000_000
TOKENIZER_DIR = "google/umt5-xxl"
LORA_TARGET = "blocks.0.self_attn.q"  # Wan name; ours: blocks.0.attn1.to_q


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(1)
    return load_config(None, {"video.size": SIZE, "model.text_encoder.tokenizer": TOKENIZER_DIR})


def _scramble(module: nn.Module, seed: int, bf16_exact: bool = False) -> nn.Module:
    """Distinct random values in every tensor, so a swapped pair of names (norm1/norm2, wi_0/wi_1) shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.dtype.is_floating_point:
                values = torch.randn(tensor.shape, generator=g) * 0.1
                tensor.copy_(values.bfloat16().float() if bf16_exact else values)
    return module.eval()


@pytest.fixture(scope="module")
def source(cfg) -> dict[str, nn.Module]:
    model = cfg.model
    return {
        "dit": _scramble(AvatarDiT(model.dit), 1),
        "vae": _scramble(build_vae(model.vae), 2),
        "text_encoder": _scramble(UMT5EncoderModel(umt5_config(model.text_encoder)), 3, bf16_exact=True),
        "audio_encoder": _scramble(Wav2Vec2Model(wav2vec2_config(model.audio_encoder)), 4),
    }


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=120, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    text = ["A person talking to the camera.", "a woman speaks calmly", "the quick brown fox jumps"] * 20
    tokenizer.train_from_iterator(text, trainer)
    fast = T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
    fast.save_pretrained(str(folder))


def _write_wav2vec2(folder: Path, cfg, model: Wav2Vec2Model) -> None:
    """As the published folder: a Wav2Vec2ForCTC (lm_head, masked_spec_embed) under the `wav2vec2.` prefix."""
    config = wav2vec2_config(cfg.model.audio_encoder)
    config.vocab_size, config.mask_time_prob = 32, 0.05
    ctc = Wav2Vec2ForCTC(config)
    ctc.wav2vec2.load_state_dict(model.state_dict(), strict=False)  # masked_spec_embed: training only
    ctc.save_pretrained(str(folder))


def write_published_folder(folder: Path, cfg, source: dict[str, nn.Module]) -> Path:
    """The Wan2.2-S2V-14B checkpoint folder layout, every file in its original naming."""
    write_sharded(original_state_dict(source["dit"]), folder, SHARD_BYTES)
    num_res_blocks = cfg.model.vae.num_res_blocks
    torch.save(
        {diffusers_vae_to_wan(k, num_res_blocks): v.clone() for k, v in source["vae"].state_dict().items()},
        folder / VAE_FILE,
    )
    t5 = {
        transformers_t5_to_wan(k): p.detach().bfloat16() for k, p in source["text_encoder"].named_parameters()
    }
    torch.save(t5, folder / T5_FILE)  # Wan publishes the umT5 encoder in bf16
    _write_tokenizer(folder / TOKENIZER_DIR)
    _write_wav2vec2(folder / WAV2VEC2_DIR, cfg, source["audio_encoder"])
    return folder


@pytest.fixture(scope="module")
def published(tmp_path_factory, cfg, source) -> Path:
    return write_published_folder(tmp_path_factory.mktemp("Wan2.2-S2V-14B"), cfg, source)


def _with(cfg, **model_fields):
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **model_fields))


def _assert_same(source: nn.Module, loaded: nn.Module, skip: set[str] = frozenset()) -> int:
    want, got = source.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        if key not in skip:
            assert got[key].dtype == want[key].dtype, key
            assert torch.equal(got[key], want[key]), key
    return len(want)


def test_published_folder_has_the_real_file_names_and_original_keys(published) -> None:
    names = {p.relative_to(published).as_posix() for p in published.rglob("*") if p.is_file()}
    assert {
        "diffusion_pytorch_model.safetensors.index.json",
        VAE_FILE,
        T5_FILE,
        f"{WAV2VEC2_DIR}/config.json",
        f"{WAV2VEC2_DIR}/model.safetensors",
    } <= names
    assert any(n.startswith(f"{TOKENIZER_DIR}/tokenizer") for n in names)
    vae_keys = set(torch.load(published / VAE_FILE, weights_only=True))
    assert {
        "conv1.weight",
        "conv2.bias",
        "encoder.conv1.weight",
        "encoder.downsamples.0.residual.0.gamma",
        "encoder.middle.1.to_qkv.weight",
        "decoder.upsamples.2.resample.1.weight",
        "decoder.upsamples.2.time_conv.weight",
        "decoder.head.2.weight",
    } <= vae_keys
    t5_keys = set(torch.load(published / T5_FILE, weights_only=True))
    assert {
        "token_embedding.weight",
        "norm.weight",
        "blocks.0.attn.q.weight",
        "blocks.1.ffn.gate.0.weight",
        "blocks.1.ffn.fc1.weight",
        "blocks.1.pos_embedding.embedding.weight",
    } <= t5_keys


def test_every_part_of_the_published_folder_loads_bit_exact(published, cfg, source) -> None:
    models = AvatarModels.load(_with(cfg, checkpoint=str(published)))
    loaded = {
        "dit": models.dit,
        "vae": models.vae.vae,
        "text_encoder": models.text_encoder.model,
        "audio_encoder": models.audio_encoder.model,
    }
    counts = {name: _assert_same(source[name], module) for name, module in loaded.items()}
    assert all(n > 0 for n in counts.values())
    for module in loaded.values():
        assert not any(t.is_meta for t in module.state_dict().values())
    # umT5's embedding is shared with the encoder stack: one tensor, not two copies
    t5 = models.text_encoder.model
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    assert isinstance(models.text_encoder.tokenizer, PretrainedTokenizer)


def test_published_folder_with_lora_runs_a_clip(published, cfg, source, tmp_path) -> None:
    dim = cfg.model.dit.dim
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, dim, generator=g), torch.randn(dim, 4, generator=g)
    lora = tmp_path / "liveavatar.safetensors"
    save_file(
        {
            f"base_model.model.{LORA_TARGET}.lora_A.default.weight": down,
            f"base_model.model.{LORA_TARGET}.lora_B.default.weight": up,
        },
        str(lora),
        metadata={"lora_alpha": "8"},
    )
    run_cfg = _with(cfg, checkpoint=str(published), lora=str(lora))
    models = AvatarModels.load(run_cfg)
    merged = source["dit"].blocks[0].attn1.to_q.weight + 8 / 4 * (up @ down)
    assert torch.equal(models.dit.blocks[0].attn1.to_q.weight, merged)
    _assert_same(source["dit"], models.dit, skip={"blocks.0.attn1.to_q.weight"})

    avatar = StreamingAvatar(models, run_cfg)
    image = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    avatar.start(image, "A person talking to the camera.")
    samples = avatar.context_samples + avatar.clip_samples
    t = np.arange(samples) / avatar.sample_rate_hz
    window = AudioWindow(
        samples=(0.3 * np.sin(2 * np.pi * 150 * t)).astype(np.float32),
        new_from=avatar.context_samples,
        t0=0.0,
        clip_index=0,
    )
    clip = avatar.next_clip(window)
    assert clip.frames.shape == (cfg.video.infer_frames, 64, 64, 3) and clip.frames.dtype == np.uint8
    assert avatar.denoiser_calls > 0
    avatar.close()


def test_bfloat16_load_puts_every_part_in_bfloat16(published, cfg) -> None:
    bf16 = dataclasses.replace(
        _with(cfg, checkpoint=str(published)), runtime=dataclasses.replace(cfg.runtime, dtype="bfloat16")
    )
    models = AvatarModels.load(bf16)
    assert models.vae.vae.decoder.conv_in.weight.dtype == torch.bfloat16
    assert models.text_encoder.model.shared.weight.dtype == torch.bfloat16
    assert models.audio_encoder.model.encoder.layers[0].attention.q_proj.weight.dtype == torch.bfloat16
    assert models.dit.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert models.dit.blocks[0].scale_shift_table.dtype == torch.float32


def test_legacy_wav2vec2_bin_with_weight_norm_g_v_names_loads(tmp_path, cfg, source) -> None:
    from model.weights.encoders import load_wav2vec2

    folder = tmp_path / WAV2VEC2_DIR
    _write_wav2vec2(folder, cfg, source["audio_encoder"])
    state = {}
    with torch.no_grad():
        from safetensors.torch import load_file

        for key, tensor in load_file(str(folder / "model.safetensors")).items():
            key = key.replace("conv.parametrizations.weight.original0", "conv.weight_g")
            state[key.replace("conv.parametrizations.weight.original1", "conv.weight_v")] = tensor
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in state
    with torch.device("meta"):
        model = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder))
    load_wav2vec2(model, tmp_path, cfg.model.audio_encoder)
    _assert_same(source["audio_encoder"], model)


def _copy_folder(published: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(published, target)
    return target


def test_missing_vae_file_is_named(published, cfg, tmp_path) -> None:
    folder = _copy_folder(published, tmp_path / "ck")
    (folder / VAE_FILE).unlink()
    with pytest.raises(CheckpointError, match=VAE_FILE):
        AvatarModels.load(_with(cfg, checkpoint=str(folder)))


def test_vae_with_a_missing_key_names_the_file_and_the_original_key(published, cfg, tmp_path) -> None:
    folder = _copy_folder(published, tmp_path / "ck")
    state = torch.load(folder / VAE_FILE, weights_only=True)
    del state["decoder.upsamples.0.residual.3.gamma"]
    state["decoder.extra.weight"] = torch.zeros(1)
    torch.save(state, folder / VAE_FILE)
    with pytest.raises(CheckpointError) as err:
        AvatarModels.load(_with(cfg, checkpoint=str(folder)))
    message = str(err.value)
    assert VAE_FILE in message and "decoder.up_blocks.0.resnets.0.norm2.gamma" in message
    assert "decoder.extra.weight" in message and "--model.vae" in message


def test_t5_of_another_size_names_the_file_and_shapes(published, cfg, tmp_path) -> None:
    folder = _copy_folder(published, tmp_path / "ck")
    state = torch.load(folder / T5_FILE, weights_only=True)
    state["token_embedding.weight"] = torch.zeros(100, cfg.model.text_encoder.d_model, dtype=torch.bfloat16)
    torch.save(state, folder / T5_FILE)
    with pytest.raises(
        CheckpointError, match=r"(?s)models_t5_umt5-xxl-enc-bf16\.pth.*token_embedding\.weight \[100"
    ):
        AvatarModels.load(_with(cfg, checkpoint=str(folder)))


def test_wav2vec2_config_of_another_size_is_refused_with_the_flag(published, cfg, tmp_path) -> None:
    folder = _copy_folder(published, tmp_path / "ck")
    config_path = folder / WAV2VEC2_DIR / "config.json"
    config = json.loads(config_path.read_text())
    config["hidden_size"] = 1024
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"hidden_size=1024 \(model\.audio_encoder\.hidden_size=64\)"):
        AvatarModels.load(_with(cfg, checkpoint=str(folder)))


def test_missing_wav2vec2_folder_is_named(published, cfg, tmp_path) -> None:
    import shutil

    folder = _copy_folder(published, tmp_path / "ck")
    shutil.rmtree(folder / WAV2VEC2_DIR)
    with pytest.raises(CheckpointError, match=WAV2VEC2_DIR):
        AvatarModels.load(_with(cfg, checkpoint=str(folder)))


def test_diffusers_wan_s2v_names_load_bit_exact(tmp_path, cfg, source) -> None:
    """diffusers WanS2VTransformer3DModel naming (PR #12258): condition_embedder.causal_audio_encoder etc."""
    names = {ours_to_diffusers(k): v for k, v in source["dit"].state_dict().items()}
    assert "condition_embedder.causal_audio_encoder.weights" in names
    assert "condition_embedder.pose_embedder.weight" in names
    assert "trainable_condition_mask.weight" in names
    assert "audio_injector.injector.0.to_q.weight" in names and "blocks.0.attn1.to_q.weight" in names
    write_sharded(names, tmp_path / "pipe" / "transformer", SHARD_BYTES)
    _assert_same(source["dit"], load_dit(cfg.model.dit, tmp_path / "pipe"))


def test_diffusers_names_with_the_earlier_casual_spelling_load(tmp_path, cfg, source) -> None:
    names = {
        ours_to_diffusers(k).replace("causal_audio_encoder", "casual_audio_encoder"): v
        for k, v in source["dit"].state_dict().items()
    }
    assert "condition_embedder.casual_audio_encoder.weights" in names
    write_sharded(names, tmp_path / "pipe" / "transformer", SHARD_BYTES)
    _assert_same(source["dit"], load_dit(cfg.model.dit, tmp_path / "pipe"))
