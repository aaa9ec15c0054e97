"""Config checks that tie the DiT to its encoders and the clip length to the audio rate."""
from __future__ import annotations

import pytest

from model.config import ConfigError, load_config


def test_dit_and_encoder_sizes_must_agree():
    with pytest.raises(ConfigError, match="--model.dit.audio_dim"):
        load_config(None, {"model.dit.audio_dim": 32})
    with pytest.raises(ConfigError, match="--model.dit.num_audio_layers"):
        load_config(None, {"model.audio_encoder.num_hidden_layers": 3})
    with pytest.raises(ConfigError, match="--model.dit.text_dim"):
        load_config(None, {"model.text_encoder.d_model": 32})


def test_clip_must_hold_a_whole_number_of_audio_samples():
    with pytest.raises(ConfigError, match="--video.fps"):
        load_config(None, {"video.fps": 7})


def test_text_encoder_can_run_on_the_cpu_and_bad_devices_are_refused() -> None:
    import pytest
    import torch

    from model.config import ConfigError, load_config
    from model.stream.avatar import AvatarModels, module_device

    cfg = load_config(None, {"runtime.text_encoder_device": "cpu"})
    assert module_device(cfg, "text_encoder") == torch.device("cpu")
    assert module_device(cfg, "vae") == torch.device(cfg.runtime.device)
    models = AvatarModels.load(cfg)
    assert models.text_encoder.device.type == "cpu"
    assert models.text_encoder.encode("hello").shape[-1] == cfg.model.dit.text_dim
    with pytest.raises(ConfigError, match="--runtime.text_encoder_device: must be auto"):
        load_config(None, {"runtime.text_encoder_device": "gpu"})
