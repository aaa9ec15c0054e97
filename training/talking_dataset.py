"""Talking-face samples (video, audio, ground-truth mouth) in two disjoint splits, and their files on disk.

`train` and `heldout` share voices but no identity and no sentence, so held-out scores measure what the
model learnt about mouths, not what it memorised about faces or texts.

    python -m training.talking_dataset --split heldout --count 4 --out artifacts/heldout
"""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.mouth_motion import mouth_track
from training.speech import (
    HELDOUT_SENTENCES,
    SAMPLE_RATE_HZ,
    TRAIN_SENTENCES,
    Utterance,
    make_utterance,
    write_wav,
)
from training.synthetic_faces import (
    Identity,
    head_motion,
    mouth_box,
    reference_image,
    render_video,
    sample_identity,
    sample_varied_identity,
)

SPLITS = ("train", "heldout")
TRAIN_IDENTITY_SEEDS = tuple(range(24))
HELDOUT_IDENTITY_SEEDS = tuple(range(1000, 1006))
VARIED_HELDOUT_SEED = 50_000  # varied faces for acceptance: seeds from here on (training stays below 1000)
_SPLIT_CODE = {"train": 1, "heldout": 2}


@dataclass(frozen=True)
class TalkingSample:
    """One talking-face clip with everything a metric needs to judge a model's version of it."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    audio: np.ndarray  # float32 [N], what the model hears
    sample_rate_hz: int
    fps: float
    opening: np.ndarray  # float32 [T], ground-truth mouth opening 0..1
    spread: np.ndarray  # float32 [T]
    mouth_box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, end exclusive
    reference: np.ndarray  # uint8 [H, W, 3], closed-mouth still of the identity
    identity: Identity | None  # None: the server's drawn face or a photograph
    text: str
    voice: str


def split_identities(split: str, count: int | None = None) -> list[Identity]:
    """The identities of one split; no identity is in both.

    `count` widens the train split beyond its 24 standard faces (seeds 0..count-1, all below the
    held-out seeds): more faces teach the model to take the identity from the reference, not to remember it.
    """
    _check_split(split)
    seeds = TRAIN_IDENTITY_SEEDS if split == "train" else HELDOUT_IDENTITY_SEEDS
    if count is not None:
        if split != "train" or not 1 <= count <= min(HELDOUT_IDENTITY_SEEDS):
            raise ValueError(f"only the train split can be widened, to 1..{min(HELDOUT_IDENTITY_SEEDS)} "
                             f"identities; got {split!r} with count {count}")
        seeds = tuple(range(count))
    return [sample_identity(seed, name=f"{split}-{k}") for k, seed in enumerate(seeds)]


def split_sentences(split: str) -> tuple[str, ...]:
    """The sentences one split speaks; no sentence is in both."""
    _check_split(split)
    return TRAIN_SENTENCES if split == "train" else HELDOUT_SENTENCES


def utterance_seed(split: str, index: int) -> int:
    """Seed of the `index`-th utterance of a split (splits never share a seed)."""
    _check_split(split)
    return _SPLIT_CODE[split] * 1_000_003 + index


def make_sample(split: str, index: int, size: int, fps: float,
                sample_rate_hz: int = SAMPLE_RATE_HZ) -> TalkingSample:
    """The `index`-th sample of a split: identities cycle, each index speaks its own utterance."""
    identities = split_identities(split)
    utterance = make_utterance(utterance_seed(split, index), sentences=split_sentences(split),
                               sample_rate_hz=sample_rate_hz)
    return render_sample(identities[index % len(identities)], utterance, motion_seed=utterance_seed(split, index),
                         size=size, fps=fps)


def render_sample(identity: Identity, utterance: Utterance, motion_seed: int, size: int, fps: float) -> TalkingSample:
    """Draw `identity` saying `utterance`: the mouth follows the clean speech, the head sways on its own."""
    track = mouth_track(utterance.clean, utterance.sample_rate_hz, fps)
    motion = head_motion(motion_seed, len(track), fps)
    frames = render_video(identity, track, motion, size)
    num_samples = round(len(track) / fps * utterance.sample_rate_hz)
    return TalkingSample(frames=frames, audio=utterance.samples[:num_samples], sample_rate_hz=utterance.sample_rate_hz,
                         fps=fps, opening=track.opening, spread=track.spread, mouth_box=mouth_box(identity, size),
                         reference=reference_image(identity, size), identity=identity, text=utterance.text,
                         voice=utterance.voice)


def render_drawn_sample(utterance: Utterance, size: int, fps: float) -> TalkingSample:
    """The server's drawn default face saying `utterance` (no sway: it is a drawing)."""
    from server.reference_image import drawn_mouth_box, drawn_reference

    track = mouth_track(utterance.clean, utterance.sample_rate_hz, fps)
    frames = np.stack([drawn_reference(size, size, float(o)) for o in track.opening]) if len(track) else \
        np.zeros((0, size, size, 3), np.uint8)
    num_samples = round(len(track) / fps * utterance.sample_rate_hz)
    return TalkingSample(frames=frames, audio=utterance.samples[:num_samples], sample_rate_hz=utterance.sample_rate_hz,
                         fps=fps, opening=track.opening, spread=track.spread, mouth_box=drawn_mouth_box(size, size),
                         reference=drawn_reference(size, size), identity=None, text=utterance.text,
                         voice=utterance.voice)


def render_still_sample(photo: np.ndarray, utterance: Utterance, size: int, fps: float) -> TalkingSample:
    """A photograph with no mouth to move: whatever is said, every frame is the photo unchanged."""
    track = mouth_track(utterance.clean, utterance.sample_rate_hz, fps)
    reference = np.asarray(Image.fromarray(photo).resize((size, size), Image.Resampling.LANCZOS), np.uint8)
    num_samples = round(len(track) / fps * utterance.sample_rate_hz)
    zeros = np.zeros(len(track), np.float32)
    return TalkingSample(frames=np.repeat(reference[None], len(track), axis=0),
                         audio=utterance.samples[:num_samples], sample_rate_hz=utterance.sample_rate_hz, fps=fps,
                         opening=zeros, spread=zeros + 0.5, mouth_box=(0, 0, 0, 0), reference=reference,
                         identity=None, text=utterance.text, voice=utterance.voice)


def varied_heldout_identities(count: int) -> list[Identity]:
    """Faces for acceptance drawn like the varied training faces but from seeds training never uses
    (procedural backdrops only: no photograph of the training bank)."""
    return [sample_varied_identity(seed, name=f"heldout-varied-{k}") for k, seed in
            enumerate(range(VARIED_HELDOUT_SEED, VARIED_HELDOUT_SEED + count))]


def write_sample(sample: TalkingSample, out_dir: str | Path, name: str) -> dict[str, Path]:
    """Write NAME.wav, NAME_reference.png, NAME_frames.npz and NAME.json (the ground truth) into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"audio": out / f"{name}.wav", "reference": out / f"{name}_reference.png",
             "frames": out / f"{name}_frames.npz", "truth": out / f"{name}.json"}
    write_wav(str(paths["audio"]), sample.audio, sample.sample_rate_hz)
    Image.fromarray(sample.reference).save(paths["reference"])
    np.savez_compressed(paths["frames"], frames=sample.frames)
    truth = {"fps": sample.fps, "sample_rate_hz": sample.sample_rate_hz, "num_frames": len(sample.frames),
             "mouth_opening": [round(float(v), 5) for v in sample.opening],
             "mouth_spread": [round(float(v), 5) for v in sample.spread],
             "mouth_box": list(sample.mouth_box),
             "identity": asdict(sample.identity) if sample.identity is not None else None,
             "text": sample.text, "voice": sample.voice}
    paths["truth"].write_text(json.dumps(truth, indent=1))
    return paths


def read_truth(path: str | Path) -> dict:
    """The ground truth written by `write_sample` (mouth_opening per frame, mouth_box, fps, ...)."""
    truth = json.loads(Path(path).read_text())
    truth["mouth_opening"] = np.asarray(truth["mouth_opening"], np.float32)
    truth["mouth_box"] = tuple(truth["mouth_box"])
    return truth


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write synthetic talking-face samples with their ground truth.")
    parser.add_argument("--split", choices=SPLITS, default="heldout")
    parser.add_argument("--count", type=int, default=4)
    parser.add_argument("--out", default="artifacts/talking_faces")
    parser.add_argument("--size", type=int, default=128, help="square frame side in pixels")
    parser.add_argument("--fps", type=float, default=16.0)
    args = parser.parse_args(argv)
    for index in range(args.count):
        sample = make_sample(args.split, index, args.size, args.fps)
        paths = write_sample(sample, args.out, f"{args.split}_{index:04d}")
        print(f"{paths['audio']}: {len(sample.frames)} frames, {sample.identity.name}, {sample.text!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
