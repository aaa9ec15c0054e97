"""Fill a whole model from a published Wan2.2-S2V-14B folder: the DiT shards (+ LoRA) and the encoders' files.

Kept apart from `checkpoint.py` (the DiT's layouts) and `encoders.py` (the encoders' layouts), which both
build on `checkpoint.py`, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from model.config import AppConfig
from model.net.dit import AvatarDiT
from model.weights import encoders as encoder_weights
from model.weights.checkpoint import fill_dit


def load_published(
    path: str | Path,
    cfg: AppConfig,
    *,
    dit: AvatarDiT,
    vae: nn.Module | None = None,
    audio_encoder: nn.Module | None = None,
    text_encoder: nn.Module | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Fill every module given, in place, from a published Wan2.2-S2V-14B folder (+ cfg.model.lora merged).

    DiT from the safetensors shards, `vae` (AutoencoderKLWan) from Wan2.1_VAE.pth, `text_encoder`
    (UMT5EncoderModel) from the umT5 .pth, `audio_encoder` (Wav2Vec2Model) from the wav2vec2 subfolder.
    Tensors on `meta` go to `device`/`dtype`; materialised ones keep theirs. Returns the parts filled.
    """
    fill_dit(dit, path, cfg.model.lora, device, dtype)
    filled = ["dit"]
    folder = Path(path)
    if vae is not None:
        encoder_weights.load_wan_vae(vae, folder, cfg.model.vae, device, dtype)
        filled.append("vae")
    if text_encoder is not None:
        encoder_weights.load_umt5(text_encoder, folder, device, dtype)
        filled.append("text_encoder")
    if audio_encoder is not None:
        encoder_weights.load_wav2vec2(audio_encoder, folder, cfg.model.audio_encoder, device, dtype)
        filled.append("audio_encoder")
    return filled
