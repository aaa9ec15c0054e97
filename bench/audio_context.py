"""How far the live path's windowed wav2vec2 features are from the reference's whole-file ones (CPU).

    .venv/bin/python bench/audio_context.py [--lookahead_ms 0,40,80,160,320,640] [--seconds 40]

Speech: espeak-ng reading held-out sentences with two voices (real synthesised speech, `training.speech`).
Encoder: the shipped tiny avatar's wav2vec2 (model/assets/tiny_avatar.safetensors). Reference: `WholeFileFeatures`
(one pass over the file, normalised once). Live: `ClipWindower` windows of the tiny preset (1 s of context,
0.75 s clips) with each look-ahead, through `AudioEncoder.encode_window`. Per video frame: relative error
|f_window - f_whole| / |f_whole| over all layers' rows; summarised by the frame's place in its clip. Last, the
whole file encoded in pieces (`whole_file_max_s`) against one pass.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import REPO_ROOT, load_config
from model.encoders.audio import (
    AudioEncoder,
    WholeFileFeatures,
    frame_feature_positions,
    sample_rows,
    wav2vec2_config,
)
from model.stream.windowing import ClipWindower
from model.weights.checkpoint import load_bundle
from training.speech import synthesize

BUNDLE = REPO_ROOT / "model" / "assets" / "tiny_avatar.safetensors"
SENTENCES = (
    "The weather turned cold last night, so we lit the fire and read until the early hours.",
    "Could you tell me where the nearest train station is? I think I have lost my way.",
    "Numbers like four hundred and twelve are easy to say but hard to remember later.",
    "She opened the window, looked at the garden, and smiled at the birds on the fence.",
)


def speech(seconds: float, sample_rate_hz: int) -> np.ndarray:
    """Sentences spoken by two espeak-ng voices with short pauses, until `seconds` long."""
    parts, total, k = [], 0, 0
    while total < seconds * sample_rate_hz:
        said = synthesize(SENTENCES[k % len(SENTENCES)], ("en-us", "en")[k % 2], sample_rate_hz=sample_rate_hz)
        pause = np.zeros(int(0.3 * sample_rate_hz), np.float32)
        parts += [said, pause]
        total += len(said) + len(pause)
        k += 1
    return np.concatenate(parts)[: int(seconds * sample_rate_hz)]


def trained_encoder() -> AudioEncoder:
    cfg = load_config(None)
    model = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder))
    load_bundle(BUNDLE, audio_encoder=model)
    return AudioEncoder(model, cfg.audio_sample_rate_hz)


def relative_errors(features: torch.Tensor, reference: torch.Tensor) -> np.ndarray:
    """Per frame: |f - ref| / |ref| over the frame's rows of every layer."""
    diff = (features - reference).flatten(1).norm(dim=1)
    return (diff / reference.flatten(1).norm(dim=1).clamp_min(1e-12)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lookahead_ms", default="0,40,80,160,320,640")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--piece_s", type=float, default=12.0, help="piece length for the chunked whole-file row")
    args = parser.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(None)
    sr, fps, frames = cfg.audio_sample_rate_hz, cfg.video.fps, cfg.video.infer_frames
    clip = round(frames / fps * sr)
    context = round(cfg.model.audio_encoder.context_s * sr)
    encoder = trained_encoder()
    pcm = speech(args.seconds, sr)
    clips = len(pcm) // clip
    pcm = pcm[: clips * clip]  # whole clips: every frame has real audio in both paths
    whole = WholeFileFeatures(encoder, pcm, clip)
    windows = ClipWindower(clip, context, sr).push(pcm)
    reference = torch.cat([whole.encode_window(w, fps, frames) for w in windows])
    print(f"speech: {len(pcm) / sr:.1f} s of espeak-ng, {clips} clips of {frames} frames at {fps:g} fps; "
          f"context {context / sr:g} s; tiny wav2vec2 of the shipped bundle")
    print("| look-ahead | latency added | all frames: mean / p90 | first 3 frames of a clip | middle | "
          "last 3 frames | last frame |")
    print("|---|---|---|---|---|---|---|")
    place = np.tile(np.arange(frames), clips)
    for ms in (int(v) for v in args.lookahead_ms.split(",")):
        lookahead = round(ms / 1000 * sr)
        windower = ClipWindower(clip, context, sr, lookahead_samples=lookahead)
        cut = windower.push(pcm) + windower.flush()
        live = torch.cat([encoder.encode_window(w, fps, frames) for w in cut[:clips]])
        err = relative_errors(live, reference)
        middle = err[(place >= 3) & (place < frames - 3)]
        print(f"| {ms} ms | {ms} ms | {err.mean():.3f} / {np.percentile(err, 90):.3f} | "
              f"{err[place < 3].mean():.3f} | {middle.mean():.3f} | {err[place >= frames - 3].mean():.3f} | "
              f"{err[place == frames - 1].mean():.3f} |", flush=True)
    for ms in (0, 320):  # the same windows normalised with the whole file's mean and variance: context alone
        lookahead = round(ms / 1000 * sr)
        windower = ClipWindower(clip, context, sr, lookahead_samples=lookahead)
        cut = (windower.push(pcm) + windower.flush())[:clips]
        live = torch.cat([sample_rows(encoder.hidden_states(w.samples, whole.normalisation),
                                      frame_feature_positions(w.new_from / sr, fps, frames)) for w in cut])
        err = relative_errors(live, reference)
        print(f"| {ms} ms, windows normalised with the file's mean/var | {ms} ms | {err.mean():.3f} / "
              f"{np.percentile(err, 90):.3f} | {err[place < 3].mean():.3f} | "
              f"{err[(place >= 3) & (place < frames - 3)].mean():.3f} | {err[place >= frames - 3].mean():.3f} | "
              f"{err[place == frames - 1].mean():.3f} |", flush=True)
    pieces = WholeFileFeatures(encoder, pcm, clip, max_piece_s=args.piece_s)
    chunked = torch.cat([pieces.encode_window(w, fps, frames) for w in windows])
    err = relative_errors(chunked, reference)
    print(f"whole file in {pieces.pieces} pieces of {pieces.piece_samples / sr:g} s (+{pieces.PIECE_CONTEXT_S:g} s "
          f"each side) vs one pass: mean {err.mean():.2e}, max {err.max():.2e}")


if __name__ == "__main__":
    main()
