"""S2V audio conditioning: wav2vec2 layers mixed into per-latent-frame tokens, injected by cross-attention.

Mirrors Wan2.2 `wan/modules/s2v/audio_utils.py` (CausalAudioEncoder, AudioInjector_WAN) and
`auxi_blocks.py` (MotionEncoder_tc); module names are the checkpoint's key names
(`casual_audio_encoder.*`, `audio_injector.*`, spelling included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.normalization import AdaLayerNorm
from diffusers.models.transformers.transformer_wan import WanAttention, WanAttnProcessor
from torch import nn

# The reference prepends `motion_frames` (73) copies of the block's first audio frame before the
# causal convs (two stride-2 convs: 4 video frames -> 1 latent frame) and drops the first 19 outputs.
# The prefix is constant, so any prefix with the same length mod 4 gives the same last outputs:
# one frame, and one output to drop (tests/model/test_dit.py checks this against 73).
AUDIO_PREFIX_FRAMES = 1
AUDIO_PREFIX_LATENTS = 1


class CausalConv1d(nn.Module):
    """Conv1d padded on the left only (replicate), so frame t never sees audio after t."""

    def __init__(self, chan_in: int, chan_out: int, kernel_size: int = 3, stride: int = 1):
        super().__init__()
        self.left_pad = kernel_size - 1
        self.conv = nn.Conv1d(chan_in, chan_out, kernel_size, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (self.left_pad, 0), mode="replicate"))


class AudioTokenEncoder(nn.Module):
    """Video-rate features [B, T, A] -> tokens per latent frame (local [B,T/4,n+1,C], global [B,T/4,1,C])."""

    def __init__(self, in_dim: int, hidden_dim: int, num_tokens: int):
        super().__init__()
        self.num_heads = num_tokens
        self.conv1_local = CausalConv1d(in_dim, hidden_dim // 4 * num_tokens, 3, stride=1)
        self.conv1_global = CausalConv1d(in_dim, hidden_dim // 4, 3, stride=1)
        self.conv2 = CausalConv1d(hidden_dim // 4, hidden_dim // 2, 3, stride=2)
        self.conv3 = CausalConv1d(hidden_dim // 2, hidden_dim, 3, stride=2)
        self.final_linear = nn.Linear(hidden_dim, hidden_dim)
        self.norm1 = nn.LayerNorm(hidden_dim // 4, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_dim // 2, elementwise_affine=False, eps=1e-6)
        self.norm3 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.padding_tokens = nn.Parameter(torch.zeros(1, 1, 1, hidden_dim))

    def _downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C/4, T] after conv1 -> [N, T/4, C]: norm/act, two stride-2 causal convs."""
        x = F.silu(self.norm1(x.transpose(1, 2))).transpose(1, 2)
        x = F.silu(self.norm2(self.conv2(x).transpose(1, 2))).transpose(1, 2)
        return F.silu(self.norm3(self.conv3(x).transpose(1, 2)))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = feats.shape[0]
        x = feats.transpose(1, 2)  # [B, A, T]
        local = self.conv1_local(x)  # [B, n*C/4, T]
        local = local.unflatten(1, (self.num_heads, -1)).flatten(0, 1)  # [(B n), C/4, T]
        local = self._downsample(local)  # [(B n), T', C]
        local = local.unflatten(0, (b, self.num_heads)).transpose(1, 2)  # [B, T', n, C]
        pad = self.padding_tokens.expand(b, local.shape[1], 1, -1)
        local = torch.cat([local, pad.to(local.dtype)], dim=2)  # [B, T', n+1, C]
        glob = self.final_linear(self._downsample(self.conv1_global(x)))[:, :, None]  # [B, T', 1, C]
        return glob, local


class CausalAudioEncoder(nn.Module):
    """Mixes the wav2vec2 layers with learned softmax-free weights, then encodes tokens per latent frame."""

    def __init__(self, audio_dim: int, num_audio_layers: int, out_dim: int, num_tokens: int = 4):
        super().__init__()
        self.encoder = AudioTokenEncoder(audio_dim, out_dim, num_tokens)
        self.weights = nn.Parameter(torch.full((1, num_audio_layers, 1, 1), 0.01))

    def forward(
        self,
        audio: torch.Tensor,
        prefix_frames: int = AUDIO_PREFIX_FRAMES,
        drop_latents: int = AUDIO_PREFIX_LATENTS,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, 4F, layers, A] -> (global [B,F,1,C], local [B,F,n+1,C]); first frame pads the past."""
        audio = torch.cat([audio[:, :1].expand(-1, prefix_frames, -1, -1), audio], dim=1)
        weights = F.silu(self.weights.float()).squeeze(-1).squeeze(-1)  # [1, layers]
        mixed = (audio.float() * weights[:, None, :, None]).sum(2) / weights.sum(1)  # [B, T, A]
        glob, local = self.encoder(mixed.to(self.weights.dtype))
        return glob[:, drop_latents:], local[:, drop_latents:]


class AudioInjector(nn.Module):
    """Per injected block: AdaLN from the global audio token, then cross-attention to the frame's tokens."""

    def __init__(self, dim: int, num_heads: int, inject_layers: tuple[int, ...], eps: float = 1e-6):
        super().__init__()
        self.injected_block_id = {layer: i for i, layer in enumerate(inject_layers)}
        head_dim = dim // num_heads
        self.injector = nn.ModuleList(
            [
                WanAttention(
                    dim=dim,
                    heads=num_heads,
                    dim_head=head_dim,
                    eps=eps,
                    cross_attention_dim_head=head_dim,
                    processor=WanAttnProcessor(),
                )
                for _ in inject_layers
            ]
        )
        self.injector_adain_layers = nn.ModuleList(
            [AdaLayerNorm(output_dim=dim * 2, embedding_dim=dim, chunk_dim=1) for _ in inject_layers]
        )

    def forward(
        self, layer: int, hidden: torch.Tensor, audio_global: torch.Tensor, audio_local: torch.Tensor
    ) -> torch.Tensor:
        """hidden [B, F*hw, C] (whole frames) + block `layer`'s audio residual (unchanged if not injected)."""
        idx = self.injected_block_id.get(layer)
        if idx is None:
            return hidden
        b, f = audio_local.shape[:2]
        per_frame = hidden.reshape(b * f, -1, hidden.shape[-1])  # [(B F), hw, C]
        normed = self.injector_adain_layers[idx](per_frame, temb=audio_global[:, :, 0].flatten(0, 1))
        residual = self.injector[idx](normed.to(hidden.dtype), audio_local.flatten(0, 1))
        return hidden + residual.reshape(hidden.shape)
