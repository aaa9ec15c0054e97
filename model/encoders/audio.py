"""wav2vec2 speech features, one row per video frame, for the audio-conditioned DiT.

As in Wan2.2-S2V (`wan/modules/s2v/audio_encoder.py`): run wav2vec2 over the audio, keep the hidden
states of every layer (the embedding output plus each transformer layer; the DiT mixes them with
learned weights), and sample them at the video frame times. The reference encodes a whole file in one
pass; live audio comes one clip window at a time (`AudioEncoder.encode_window`): the left context
(`context_s`) and an optional look-ahead (`lookahead_s`, paid in latency) give the transformer something
to attend to, and only the rows of the clip's new frames are returned. Offline files go through
`WholeFileFeatures`, as the reference.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2Model

from model.config import AudioEncoderConfig
from model.io_types import AudioWindow

FEATURE_RATE_HZ = 50.0  # wav2vec2's conv stack strides 320 samples at 16 kHz: one hidden row per 20 ms
REFERENCE_GRID_HZ = 30  # Wan2.2 AudioEncoder.video_rate: the rows are resampled to 30 Hz before bucketing


def wav2vec2_config(cfg: AudioEncoderConfig) -> Wav2Vec2Config:
    """A config of the wav2vec2-large-xlsr-53 family (layer-norm conv stack, pre-norm transformer) at cfg's size."""
    return Wav2Vec2Config(
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        intermediate_size=cfg.intermediate_size,
        conv_dim=list(cfg.conv_dim),
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        conv_bias=True,
        mask_time_prob=0.0,
    )


def frame_feature_positions(window_start_s: float, fps: float, num_frames: int) -> np.ndarray:
    """Fractional wav2vec2 row index of each video frame: frame k plays at window_start_s + k / fps.

    The reference takes row i as time i / 50 s and frame k as time k / fps (it passes through a 30 Hz
    grid on the way, a resampling step we skip: it moves a frame's audio by at most 1/60 s).
    """
    frame_times_s = window_start_s + np.arange(num_frames) / fps
    return frame_times_s * FEATURE_RATE_HZ


def sample_rows(hidden: torch.Tensor, positions: np.ndarray) -> torch.Tensor:
    """Linear interpolation of hidden [T, ...] at fractional row positions (clamped to the last row)."""
    pos = torch.as_tensor(positions, dtype=torch.float32, device=hidden.device).clamp(0, hidden.shape[0] - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=hidden.shape[0] - 1)
    frac = (pos - lo).view(-1, *([1] * (hidden.ndim - 1))).to(hidden.dtype)
    return hidden[lo] * (1 - frac) + hidden[hi] * frac


def reference_frame_rows(hidden: torch.Tensor, fps: float, num_frames: int) -> torch.Tensor:
    """The reference's per-frame rows of whole-file hidden states [T, ...] at 50 Hz, frames 0..num_frames-1.

    Wan2.2 `audio_encoder.py` `linear_interpolation`: the rows are stretched onto int(T / 50 * 30) rows
    (linear, align_corners=True); LiveAvatar's `get_audio_embed_bucket_fps` (m = 0) then gives frame k the
    30 Hz row round(k / fps * 30) (`get_sample_indices`, np.round) and all-zero rows past the audio's end.
    """
    rows = int(hidden.shape[0] / FEATURE_RATE_HZ * REFERENCE_GRID_HZ)
    flat = hidden.reshape(hidden.shape[0], -1).T[None].float()  # [1, features, T]
    grid = F.interpolate(flat, size=rows, mode="linear", align_corners=True)[0].T.reshape(rows, *hidden.shape[1:])
    times_s = np.linspace(0, num_frames / fps, num_frames, endpoint=False)
    index = np.round(times_s * REFERENCE_GRID_HZ).astype(int)
    out = grid.new_zeros(num_frames, *hidden.shape[1:])
    inside = torch.from_numpy(index < rows)
    out[inside] = grid[torch.from_numpy(index[index < rows])]
    return out.to(hidden.dtype)


class AudioEncoder:
    """Shared wav2vec2 weights; turns one clip window into per-frame features [frames, layers + 1, hidden]."""

    def __init__(self, model: Wav2Vec2Model, sample_rate_hz: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.sample_rate_hz = sample_rate_hz
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.num_layers = model.config.num_hidden_layers + 1  # + the embedding output, as the reference
        self.hidden_size = model.config.hidden_size
        self.min_samples = _receptive_field(model.config)

    @classmethod
    def build(cls, cfg: AudioEncoderConfig) -> AudioEncoder:
        """Random weights of the configured size (the tiny model, or before a checkpoint is loaded)."""
        return cls(Wav2Vec2Model(wav2vec2_config(cfg)), cfg.sample_rate_hz)

    @classmethod
    def from_folder(cls, folder: str | Path, cfg: AudioEncoderConfig) -> AudioEncoder:
        """A published wav2vec2 folder (config.json + weights), e.g. `wav2vec2-large-xlsr-53-english`; never downloads."""
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no wav2vec2 checkpoint at {folder} (expected config.json and weights there)")
        model = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
        if model.config.hidden_size != cfg.hidden_size or model.config.num_hidden_layers != cfg.num_hidden_layers:
            raise ValueError(
                f"{folder} holds wav2vec2 with hidden_size {model.config.hidden_size} and "
                f"{model.config.num_hidden_layers} layers, but the config says model.audio_encoder.hidden_size "
                f"{cfg.hidden_size} and num_hidden_layers {cfg.num_hidden_layers}")
        return cls(model, cfg.sample_rate_hz)

    @torch.inference_mode()
    def encode_window(self, window: AudioWindow, fps: float, num_frames: int) -> torch.Tensor:
        """Features of the window's new frames: [num_frames, layers + 1, hidden], row k for video frame k."""
        samples = np.asarray(window.samples, dtype=np.float32)
        if len(samples) < self.min_samples:
            raise ValueError(f"audio window of {len(samples)} samples is shorter than wav2vec2's "
                             f"receptive field ({self.min_samples}); give the windower more context")
        hidden = self.hidden_states(samples)
        positions = frame_feature_positions(window.new_from / self.sample_rate_hz, fps, num_frames)
        return sample_rows(hidden, positions)

    @torch.inference_mode()
    def hidden_states(self, samples: np.ndarray, normalisation: tuple[float, float] | None = None) -> torch.Tensor:
        """Every wav2vec2 hidden state of `samples` normalised as one piece: [rows at 50 Hz, layers + 1, hidden].

        `normalisation` (mean, std) from a longer stretch of audio replaces the piece's own (a whole file's)."""
        samples = np.asarray(samples, dtype=np.float32)
        mean, std = normalisation if normalisation is not None else normalisation_of(samples)
        audio = torch.from_numpy((samples - np.float32(mean)) / np.float32(std))
        out = self.model(audio.to(self.device, self.dtype)[None], output_hidden_states=True)
        return torch.stack(out.hidden_states, dim=2)[0]


class WholeFileFeatures:
    """wav2vec2 over a whole speech file, as the reference runs it offline: one pass with bidirectional
    attention over the entire file, normalised once with the whole file's mean and variance
    (Wan2.2 `audio_encoder.py` `extract_audio_feat`); clips then take their frames' rows.

    Same `encode_window` as `AudioEncoder`, so a `StreamingAvatar` given this in place of its encoder
    (`AvatarModels.audio_encoder`) renders a file with whole-file features; a window is located by its `t0`
    (stream time from the file's start) and its samples are not read again. Memory: a file longer than
    `max_piece_s` is encoded in pieces of whole clips, up to `max_piece_s` long, each hearing
    PIECE_CONTEXT_S more audio on both sides (rows of that margin are dropped); one piece's rows are held
    at a time and the pieces are made as the clips ask for them, in order.
    """

    PIECE_CONTEXT_S = 10.0

    def __init__(self, encoder: AudioEncoder, samples: np.ndarray, clip_samples: int,
                 max_piece_s: float = 300.0) -> None:
        self.encoder = encoder
        self.samples = np.asarray(samples, dtype=np.float32)
        self.sample_rate_hz = encoder.sample_rate_hz
        self.normalisation = normalisation_of(self.samples)
        self.clip_samples = clip_samples
        self.piece_samples = clip_samples * max(1, int(max_piece_s * self.sample_rate_hz) // clip_samples)
        self.pieces = 1 if len(self.samples) <= max_piece_s * self.sample_rate_hz else \
            -(-len(self.samples) // self.piece_samples)
        self._piece: tuple[int, int, torch.Tensor] | None = None  # (index, first sample heard, rows)

    def piece_of(self, sample: int) -> int:
        """Which piece holds the clip starting at `sample`."""
        return 0 if self.pieces == 1 else min(sample // self.piece_samples, self.pieces - 1)

    def _rows(self, piece: int) -> tuple[int, torch.Tensor]:
        """(first sample heard, hidden rows) of `piece`: the whole file, or the piece and its margins."""
        if self._piece is None or self._piece[0] != piece:
            if self.pieces == 1:
                start, stop = 0, len(self.samples)
            else:
                margin = round(self.PIECE_CONTEXT_S * self.sample_rate_hz)
                start = max(0, piece * self.piece_samples - margin)
                stop = min(len(self.samples), (piece + 1) * self.piece_samples + margin)
            audio = self.samples[start:stop]
            if len(audio) < self.encoder.min_samples:
                audio = np.pad(audio, (0, self.encoder.min_samples - len(audio)))
            self._piece = (piece, start, self.encoder.hidden_states(audio, self.normalisation))
        return self._piece[1], self._piece[2]

    @torch.inference_mode()
    def encode_window(self, window: AudioWindow, fps: float, num_frames: int) -> torch.Tensor:
        """Rows of the clip whose first frame plays at `window.t0` s into the file: [num_frames, layers + 1, hidden]."""
        first = round(window.t0 * self.sample_rate_hz)
        start, hidden = self._rows(self.piece_of(first))
        positions = frame_feature_positions(window.t0 - start / self.sample_rate_hz, fps, num_frames)
        return sample_rows(hidden, positions)


def normalisation_of(samples: np.ndarray) -> tuple[float, float]:
    """(mean, std) as Wav2Vec2FeatureExtractor(do_normalize=True) uses them for the xlsr-53 checkpoints."""
    return float(samples.mean()), float(np.sqrt(samples.var() + 1e-7))


def _receptive_field(config: Wav2Vec2Config) -> int:
    samples = 1
    for kernel, stride in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        samples = (samples - 1) * stride + kernel
    return samples
