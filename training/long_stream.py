"""How a bundle holds up over a long stream: identity per 30 s, drift, lip sync and CPU time per clip.

    python -m training.long_stream --bundle model/assets/tiny_avatar.safetensors --seconds 300 --subject face
    python -m training.long_stream --subject photo --seconds 120      # evaluation/assets/astronaut.png
    python -m training.long_stream --subject drawn --seconds 120      # the server's drawn default face

The speech is held-out sentences in voices never used in training (`training.voices.HELDOUT_VOICES`: another
synthesizer's voice and unseen espeak variants), changed, in a room, through Opus, one utterance after another.
The faces are held out too: varied faces from seeds training never draws, the drawn default face (in training,
but the product's first look) and a photograph (never in training). The avatar is driven clip by clip exactly as
the server drives it (`StreamingAvatar` through the live windower).

Identity PSNR is measured against the reference still outside the mouth box (for the photograph, where the model
must find no mouth to move, over the whole frame); drift is the first window's PSNR minus the last one's.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.metrics import lip_sync, mouth_opening
from model.config import REPO_ROOT, set_overrides
from model.stream.windowing import ClipWindower
from training.mouth_motion import mouth_track
from training.speech import HELDOUT_SENTENCES, SAMPLE_RATE_HZ, Utterance
from training.voices import HELDOUT_VOICES, make_varied_utterance

PHOTO = REPO_ROOT / "evaluation" / "assets" / "astronaut.png"
SUBJECTS = ("face", "drawn", "photo")


@dataclass
class LongStreamReport:
    """One long stream judged: PSNR per window, drift, lip sync (faces with a mouth), CPU seconds per clip."""

    subject: str
    seconds: float
    window_s: float
    psnr_by_window_db: list[float]
    drift_db: float  # first window minus last window
    lip_sync_lag0: float | None
    lip_sync_best_near_zero: float | None
    clip_s: list[float] = field(repr=False)
    clip_length_s: float = 0.75
    clip_cpu_s: list[float] = field(default_factory=list, repr=False)  # process CPU seconds per clip
    bare: LongStreamReport | None = field(default=None, repr=False)  # the same stream without video.detail_restore

    @property
    def mean_psnr_db(self) -> float:
        return float(np.mean(self.psnr_by_window_db))

    def summary(self) -> dict:
        clip_s = np.asarray(self.clip_s)
        return {"subject": self.subject, "seconds": round(self.seconds, 1), "window_s": self.window_s,
                "psnr_by_window_db": [round(v, 2) for v in self.psnr_by_window_db],
                "mean_psnr_db": round(self.mean_psnr_db, 2), "drift_db": round(self.drift_db, 2),
                "lip_sync_lag0": None if self.lip_sync_lag0 is None else round(self.lip_sync_lag0, 3),
                "lip_sync_best_near_zero": None if self.lip_sync_best_near_zero is None
                else round(self.lip_sync_best_near_zero, 3),
                "clip_s_median": round(float(np.median(clip_s)), 3), "clip_s_mean": round(float(clip_s.mean()), 3),
                "clip_s_max": round(float(clip_s.max()), 3),
                "clips_over_length": int((clip_s > self.clip_length_s).sum()), "clips": len(clip_s),
                **({"clip_cpu_s_median": round(float(np.median(self.clip_cpu_s)), 3),
                    "clip_cpu_s_max": round(float(np.max(self.clip_cpu_s)), 3)} if self.clip_cpu_s else {})}


def heldout_speech(seconds: float, seed: int = 0, voices: tuple[str, ...] = HELDOUT_VOICES,
                   sample_rate_hz: int = SAMPLE_RATE_HZ) -> Utterance:
    """Held-out utterances back to back (each its own voice of `voices`) until `seconds` are filled."""
    samples, clean, texts, names = [], [], [], []
    total, index = 0, 0
    while total < seconds * sample_rate_hz:
        u = make_varied_utterance(9_000_000 + seed * 1000 + index, HELDOUT_SENTENCES, voices,
                                  sample_rate_hz=sample_rate_hz, opus_share=0.5)
        samples.append(u.samples)
        clean.append(u.clean)
        texts.append(u.text)
        names.append(u.voice)
        total += len(u.samples)
        index += 1
    count = round(seconds * sample_rate_hz)
    return Utterance(samples=np.concatenate(samples)[:count], clean=np.concatenate(clean)[:count],
                     sample_rate_hz=sample_rate_hz, text=" ".join(texts), voice=", ".join(sorted(set(names))))


def subject_reference(subject: str, size: int, index: int = 0) -> tuple[np.ndarray, tuple[int, int, int, int] | None]:
    """The reference image of a subject at `size` and its mouth box (None: a photograph, judged whole)."""
    from server.reference_image import drawn_mouth_box, drawn_reference
    from training.synthetic_faces import mouth_box, reference_image
    from training.talking_dataset import varied_heldout_identities

    if subject == "face":
        identity = varied_heldout_identities(index + 1)[index]
        return reference_image(identity, size), mouth_box(identity, size)
    if subject == "drawn":
        return drawn_reference(size, size), drawn_mouth_box(size, size)
    if subject == "photo":
        image = Image.open(PHOTO).convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
        return np.asarray(image, np.uint8), None
    raise ValueError(f"unknown subject {subject!r}; use one of {SUBJECTS}")


def psnr_outside(frames: np.ndarray, reference: np.ndarray, box: tuple[int, int, int, int] | None) -> np.ndarray:
    """Per-frame PSNR (dB) against the reference, the mouth box left out (the whole frame without a box)."""
    keep = np.ones(reference.shape[:2], bool)
    if box is not None:
        x0, y0, x1, y1 = box
        keep[y0:y1, x0:x1] = False
    ref = reference.astype(np.float32)
    out = np.empty(len(frames), np.float64)
    for i, frame in enumerate(frames):
        err = ((frame.astype(np.float32) - ref) ** 2)[keep].mean()
        out[i] = 10 * np.log10(255.0**2 / max(float(err), 1e-6))
    return out


def run_stream(avatar, reference: np.ndarray, speech: Utterance, prompt: str = ""
               ) -> tuple[np.ndarray, list[float], list[float]]:
    """Every frame the avatar makes for the speech, clip by clip through the live windower, each clip's
    wall-clock seconds and the process's CPU seconds for it (all its threads: wall time on a busy machine
    counts waiting, CPU time does not)."""
    windower = ClipWindower(avatar.clip_samples, avatar.context_samples, avatar.sample_rate_hz)
    avatar.start(reference, prompt)
    frames, clip_s, cpu_s = [], [], []
    try:
        for window in windower.push(speech.samples) + windower.flush():
            started, cpu_started = time.perf_counter(), time.process_time()
            frames.append(avatar.next_clip(window).frames)
            clip_s.append(time.perf_counter() - started)
            cpu_s.append(time.process_time() - cpu_started)
    finally:
        avatar.close()
    return np.concatenate(frames), clip_s, cpu_s


def judge(subject: str, frames: np.ndarray, reference: np.ndarray, box, speech: Utterance, fps: float,
          clip_s: list[float], clip_length_s: float, window_s: float = 30.0) -> LongStreamReport:
    """PSNR per `window_s`, drift, and (with a mouth box) lip sync against the clean speech's mouth track."""
    psnr = psnr_outside(frames, reference, box)
    per_window = max(1, round(window_s * fps))
    windows = [float(psnr[s:s + per_window].mean()) for s in range(0, len(psnr), per_window)]
    if len(windows) > 1 and len(psnr) % per_window and len(psnr) % per_window < per_window // 2:
        windows = windows[:-1]  # a short tail window says little; fold it away
    lag0 = near = None
    if box is not None:
        truth = mouth_track(speech.clean, speech.sample_rate_hz, fps).opening
        count = min(len(truth), len(frames))
        score = lip_sync(mouth_opening(frames[:count], box), truth[:count])
        lag0 = score.correlation_at_zero
        near = max(score.correlation_by_lag[k] for k in (-1, 0, 1))
    return LongStreamReport(subject, len(frames) / fps, window_s, windows, windows[0] - windows[-1], lag0, near,
                            clip_s, clip_length_s)


def evaluate_bundle(bundle: str | Path, subject: str, seconds: float, window_s: float = 30.0, seed: int = 0,
                    overrides: dict | None = None, threads: int = 2, voices: tuple[str, ...] = HELDOUT_VOICES,
                    compare_restore: bool = False) -> tuple[LongStreamReport, np.ndarray]:
    """Load the bundle as served (configs/tiny.yaml), run one long stream of `subject`, judge it.

    `compare_restore`: the stream runs without `video.detail_restore` and is judged both as decoded and with the
    restore applied afterwards (it only reads the decoded frames, so that is the served output up to the uint8
    rounding of its input); returns the restored report and frames, the bare report in `report.bare`."""
    import torch

    from model.config import load_config
    from model.stream.avatar import AvatarModels, StreamingAvatar

    torch.set_num_threads(threads)
    cfg = load_config(None, {"model.checkpoint": str(bundle), **(overrides or {})})
    restore_after = compare_restore and cfg.video.detail_restore
    if restore_after:
        cfg = load_config(None, {"model.checkpoint": str(bundle), **(overrides or {}), "video.detail_restore": False})
    avatar = StreamingAvatar(AvatarModels.load(cfg), cfg)
    reference, box = subject_reference(subject, cfg.video.width)
    speech = heldout_speech(seconds, seed, voices)
    frames, clip_s, cpu_s = run_stream(avatar, reference, speech, cfg.server.prompt)
    clip_length_s = cfg.video.infer_frames / cfg.video.fps
    report = judge(subject, frames, reference, box, speech, cfg.video.fps, clip_s, clip_length_s, window_s)
    report.clip_cpu_s = cpu_s
    if restore_after:
        bare = report
        frames = restore_frames(frames, reference, cfg, per_call=cfg.video.infer_frames)
        report = judge(subject, frames, reference, box, speech, cfg.video.fps, clip_s, clip_length_s, window_s)
        report.clip_cpu_s, report.bare = cpu_s, bare
    return report, frames


def restore_frames(frames: np.ndarray, reference: np.ndarray, cfg, per_call: int) -> np.ndarray:
    """`video.detail_restore` applied to decoded uint8 frames [N, H, W, 3], `per_call` frames per call as served."""
    import torch

    from model.stream.avatar import image_to_tensor, video_to_frames
    from model.stream.detail import DetailRestore

    restore = DetailRestore.from_config(image_to_tensor(reference), cfg.video)
    out = []
    for start in range(0, len(frames), per_call):
        video = torch.from_numpy(frames[start:start + per_call]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
        out.append(video_to_frames(restore.apply(video)))
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Identity, drift, lip sync and CPU time of a bundle over a long stream.")
    p.add_argument("--bundle", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--subject", choices=SUBJECTS, default="face")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--window-s", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, e.g. "
                   "stream.scheme=ours")
    p.add_argument("--voices", default=",".join(HELDOUT_VOICES), help="comma-separated held-out voices")
    p.add_argument("--json", default=None, help="also write the summary here")
    p.add_argument("--frames-png", default=None, help="write 16 frames spread over the stream as one PNG")
    p.add_argument("--compare-restore", action="store_true", help="one stream judged bare and with "
                   "video.detail_restore (applied to the decoded frames): before/after from the same run")
    args = p.parse_args(argv)
    overrides = set_overrides(args.set)
    report, frames = evaluate_bundle(args.bundle, args.subject, args.seconds, args.window_s, args.seed, overrides,
                                     args.threads, tuple(args.voices.split(",")), args.compare_restore)
    summary = report.summary()
    if report.bare is not None:
        summary["bare"] = report.bare.summary()
    print(json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    if args.frames_png:
        picks = frames[np.linspace(0, len(frames) - 1, 16).astype(int)]
        Image.fromarray(np.concatenate([np.concatenate(picks[:8], 1), np.concatenate(picks[8:], 1)], 0)).save(
            args.frames_png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
