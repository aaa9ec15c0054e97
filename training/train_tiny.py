"""Train the embedded tiny avatar: the VAE, then the DiT with its wav2vec2, then write one safetensors bundle.

    python -m training.train_tiny --device cuda --vae-time-s 110 --dit-time-s 170     # the GPU run
    python -m training.train_tiny --vae-steps 20 --dit-steps 20 --num-streams 16      # a small CPU run
    python -m training.train_tiny --phases vae_stream --init-from PARTS --parts-dir OUT  # decoder on long streams
    python -m training.train_tiny --phases vae_stream --init-bundle B --fresh-decoder \
        --set model.vae.decoder_base_dim=8                                               # a narrower decoder

Same classes as the 14B path at the tiny config (`configs/tiny.yaml`). The text encoder stays frozen at
its seeded random init (the DiT learns to read whatever it gives; several prompts teach it to not care);
the wav2vec2 trains with the DiT, since a frozen random one hears speech only faintly. Progress is saved
to `--work-dir` every `--checkpoint-every` steps and a rerun resumes there (optimizer state included).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Wav2Vec2Model

from model.config import AppConfig, load_config, set_overrides
from model.encoders.audio import wav2vec2_config
from model.encoders.text import TextEncoder
from model.net.dit import AvatarDiT
from model.stream.avatar import AvatarModels, StreamingAvatar
from model.vae.streaming import AvatarVAE, build_vae
from model.weights import checkpoint as weights
from training.dit_training import encode_streams, train_dit_steps
from training.photos import load_photo_bank
from training.self_forcing import train_rollout_steps
from training.speech import load_speech_bank, save_speech_bank
from training.stream_pool import StreamGeometry, build_pool
from training.talking_dataset import HELDOUT_IDENTITY_SEEDS, split_sentences, utterance_seed
from training.vae_stream import decoder_parameters, train_vae_stream_steps
from training.vae_training import fit_latent_scale, train_vae_steps
from training.voices import TRAIN_VOICES, make_varied_utterance

PROMPTS = (
    "A person talking to the camera, natural light, looking at the viewer.",
    "",
    "A friendly face speaking.",
    "Portrait of someone telling a story, studio background.",
    "A cartoon character talks.",
    "Close-up of a speaker.",
)
STATE_FILE = "train_state.pt"
PARTS = {"dit": ("dit",), "vae": ("vae",), "encoders": ("audio_encoder", "text_encoder")}


def geometry_of(cfg: AppConfig) -> StreamGeometry:
    """Frame size, fps and clip cut of the config, as the live pipeline uses them."""
    if cfg.video.width != cfg.video.height:
        raise ValueError(f"the synthetic faces are square; video.size {cfg.video.size} is not")
    return StreamGeometry(size=cfg.video.width, fps=cfg.video.fps, frames_per_clip=cfg.video.infer_frames,
                          sample_rate_hz=cfg.audio_sample_rate_hz,
                          context_samples=round(cfg.model.audio_encoder.context_s * cfg.audio_sample_rate_hz))


def speech_bank(path: Path, count: int, sample_rate_hz: int) -> list:
    """Training utterances, synthesised once and kept (machines without the synthesizers reuse the file):
    the train voices of both synthesizers, voice changes, rooms and the Opus round trip (`training.voices`)."""
    if path.exists():
        utterances = load_speech_bank(str(path))
        if len(utterances) >= count:
            return utterances[:count]
    utterances = [make_varied_utterance(utterance_seed("train", i), split_sentences("train"), TRAIN_VOICES,
                                        sample_rate_hz=sample_rate_hz) for i in range(count)]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_speech_bank(str(path), utterances, keep_heard=True)
    return utterances


def training_identities(count: int, varied_share: float, photos) -> list:
    """The train faces: seeds 0..count-1, a `varied_share` of them drawn anywhere, at any size, lit, in front of
    drawn or photographed backdrops (`sample_varied_identity`), the rest the classic centred faces."""
    from training.synthetic_faces import sample_identity, sample_varied_identity

    if not 1 <= count <= min(HELDOUT_IDENTITY_SEEDS):
        raise SystemExit(f"--num-identities must be in 1..{min(HELDOUT_IDENTITY_SEEDS)}, got {count}")
    rng = np.random.default_rng(1234)
    return [sample_varied_identity(seed, f"train-{seed}", photos) if rng.random() < varied_share
            else sample_identity(seed, f"train-{seed}") for seed in range(count)]


class Trainer:
    """The networks, their optimizers and where training stands; saved and restored as one state file."""

    def __init__(self, cfg: AppConfig, args: argparse.Namespace) -> None:
        self.cfg, self.args = cfg, args
        self.device = torch.device(args.device)
        torch.manual_seed(args.seed)
        with torch.device(self.device):
            self.dit = AvatarDiT(cfg.model.dit)
            self.vae = build_vae(cfg.model.vae)
            self.wav2vec2 = Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder)).eval()
            self.text_encoder = TextEncoder.build(cfg.model.text_encoder)
        self.vae.requires_grad_(True)
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel per step, not one per tensor
        # The streaming fine-tune trains the decoder side only; the encoder stays as the DiT learned it.
        vae_params = decoder_parameters(self.vae) if args.phases == "vae_stream" else self.vae.parameters()
        self.vae_opt = torch.optim.AdamW(vae_params, lr=args.vae_lr, weight_decay=0.0, **fused)
        self.dit_opt = torch.optim.AdamW([
            {"params": self.dit.parameters(), "lr": args.dit_lr, "lr_scale": 1.0},
            {"params": self.wav2vec2.parameters(), "lr": args.dit_lr * 0.5, "lr_scale": 0.5}],
            weight_decay=0.0, **fused)
        self.started = getattr(args, "t0", None) or time.perf_counter()  # --wall-s counts from process start
        self.phase, self.step = "vae", 0
        self.rng = np.random.default_rng(args.seed)
        self.history: list[dict] = []
        self.elapsed_s = {"vae": 0.0, "dit": 0.0, "vae_stream": 0.0}
        self.micro_batches = [1]  # the streaming fine-tune's gradient-accumulation split (grows on OOM)

    def state(self) -> dict:
        return {"phase": self.phase, "step": self.step, "rng": self.rng.bit_generator.state,
                "history": self.history, "elapsed_s": self.elapsed_s,
                "dit": self.dit.state_dict(), "vae": self.vae.state_dict(), "wav2vec2": self.wav2vec2.state_dict(),
                "text_encoder": self.text_encoder.model.state_dict(),
                # The VAE's optimizer is dropped once the VAE is done: the state file stays small enough to carry.
                "vae_opt": self.vae_opt.state_dict() if self.phase in ("vae", "vae_stream") else {},
                "micro_batches": self.micro_batches[0],
                "dit_opt": self.dit_opt.state_dict()}

    def save(self, work_dir: Path) -> None:
        work_dir.mkdir(parents=True, exist_ok=True)
        tmp = work_dir / (STATE_FILE + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, work_dir / STATE_FILE)

    def restore(self, work_dir: Path) -> bool:
        path = work_dir / STATE_FILE
        if not path.exists():
            return False
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.dit.load_state_dict(state["dit"])
        self.vae.load_state_dict(state["vae"])
        self.wav2vec2.load_state_dict(state["wav2vec2"])
        self.text_encoder.model.load_state_dict(state["text_encoder"])
        if state["vae_opt"]:
            self.vae_opt.load_state_dict(state["vae_opt"])
        self.dit_opt.load_state_dict(state["dit_opt"])
        self.phase, self.step, self.history = state["phase"], state["step"], state["history"]
        self.elapsed_s = {"vae": 0.0, "dit": 0.0, "vae_stream": 0.0, **state["elapsed_s"]}
        self.micro_batches[0] = state.get("micro_batches", 1)
        self.rng.bit_generator.state = state["rng"]
        return True

    def log(self, phase: str, step: int, stats: dict) -> None:
        entry = {"phase": phase, "step": step, **{k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in stats.items()}}
        self.history.append(entry)
        print(json.dumps(entry), flush=True)


def learning_rate(peak: float, progress: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    """Linear warm-up over the first `warmup` of the phase, then a cosine down to `floor` x peak."""
    if progress < warmup:
        return peak * max(progress / warmup, 0.01)
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t)))


def run_phase(trainer: Trainer, phase: str, total_steps: int, time_budget_s: float, work_dir: Path, step_fn,
              peak_lr: float) -> None:
    """Steps in chunks of --checkpoint-every until the step count, the phase's time budget or the wall-clock
    budget of the run is reached, saving between chunks.

    The schedule follows progress = max(steps done / steps, time spent / time available), so a run cut
    by the clock still ends its cosine, and a resumed run continues where the schedule stood.
    """
    args = trainer.args
    deadline = trainer.started + args.wall_s - args.reserve_s
    # The phase ends at its own time budget or at the run's deadline, whichever comes first.
    horizon_s = min(time_budget_s, trainer.elapsed_s[phase] + deadline - time.perf_counter())
    while trainer.step < total_steps and trainer.elapsed_s[phase] < time_budget_s:
        if time.perf_counter() >= deadline:
            print(f"{phase}: wall-clock budget reached at step {trainer.step}", flush=True)
            break
        chunk = min(args.checkpoint_every, total_steps - trainer.step)
        started = time.perf_counter()
        spent_before, step_before = trainer.elapsed_s[phase], trainer.step
        phase_end = started + time_budget_s - spent_before

        def lr_at(spent_before: float = spent_before, started: float = started) -> float:
            by_time = (spent_before + time.perf_counter() - started) / horizon_s if math.isfinite(horizon_s) else 0.0
            return learning_rate(peak_lr, max(trainer.step / total_steps, by_time))

        def should_stop(phase_end: float = phase_end) -> bool:
            now = time.perf_counter()
            return now >= deadline or now >= phase_end

        def progress_at(spent_before: float = spent_before, started: float = started) -> float:
            by_time = (spent_before + time.perf_counter() - started) / horizon_s if math.isfinite(horizon_s) else 0.0
            return min(1.0, max(trainer.step / total_steps, by_time))

        done = step_fn(chunk, trainer.step, lr_at, should_stop, progress_at)
        trainer.step += done
        trainer.elapsed_s[phase] += time.perf_counter() - started
        took = time.perf_counter() - started
        print(f"{phase}: steps {step_before}..{trainer.step} in {took:.1f} s "
              f"({took / max(done, 1):.3f} s/step)", flush=True)
        trainer.save(work_dir)
        if done < chunk:
            break


def train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, {**set_overrides(args.set), "runtime.device": args.device})
    geometry = geometry_of(cfg)
    work_dir = Path(args.work_dir)
    if args.bundle_only:
        if not args.init_from:
            raise SystemExit("--bundle-only needs --init-from PARTS_DIR (the part bundles of a training run)")
        trainer = Trainer(cfg, args)
        if args.init_bundle:  # what the parts do not hold comes from this bundle
            read_bundle(trainer, Path(args.init_bundle), fresh_decoder=args.fresh_decoder)
        read_parts(trainer, Path(args.init_from), partial=bool(args.init_bundle))
        write_bundle(trainer, Path(args.out))
        return 0
    # Render before any CUDA work: the pool forks worker processes.
    utterances = speech_bank(Path(args.speech_bank), args.num_utterances, geometry.sample_rate_hz)
    started = time.perf_counter()
    photos = load_photo_bank(args.photo_bank)
    identities = training_identities(args.num_identities, args.varied_share, photos)
    streams = build_pool(utterances, identities, args.num_streams, geometry, seed=args.seed, workers=args.workers,
                         drawn_share=args.drawn_share, photos=photos, photo_share=args.photo_share)
    print(f"{len(streams)} streams, {sum(len(s.sample.frames) for s in streams)} frames rendered in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    if args.phases == "vae_stream":
        return train_vae_stream(trainer_for_stream(cfg, args, work_dir), streams, args, work_dir)
    trainer = Trainer(cfg, args)
    if trainer.restore(work_dir):
        print(f"resumed {work_dir / STATE_FILE}: phase {trainer.phase}, step {trainer.step}", flush=True)
    elif args.init_from:
        read_parts(trainer, Path(args.init_from))
        trainer.phase = "dit"
        print(f"started from the networks in {args.init_from}: DiT training only", flush=True)
    elif args.init_bundle:
        read_bundle(trainer, Path(args.init_bundle), fresh_decoder=args.fresh_decoder)
        print(f"every network starts from {args.init_bundle} (the VAE phase trains its VAE, the DiT phase its DiT)",
              flush=True)
    if trainer.phase == "vae":
        run_phase(trainer, "vae", args.vae_steps, args.vae_time_s, work_dir,
                  lambda n, at, lr_at, stop, _progress: train_vae_steps(
                      trainer.vae, trainer.vae_opt, streams, n, args.vae_batch, args.vae_frames, trainer.device,
                      trainer.rng, log_every=args.log_every, on_log=lambda s, st: trainer.log("vae", at + s, st),
                      lr_at=lr_at, should_stop=stop), args.vae_lr)
        fit_latent_scale(trainer.vae, streams, trainer.device, num_videos=args.latent_fit_videos)
        trainer.phase, trainer.step = "dit", 0
        trainer.save(work_dir)
    if args.phases == "vae":
        write_parts(trainer, Path(args.parts_dir or work_dir / "parts"))
        write_summary(trainer, work_dir)
        if args.eval_samples:
            evaluate_vae(trainer, args, work_dir)
        return 0

    vae = AvatarVAE(trainer.vae.eval().requires_grad_(False))
    latent_streams = encode_streams(vae, streams, geometry, trainer.device)
    text_contexts = torch.cat([trainer.text_encoder.encode(p) for p in PROMPTS]).to(trainer.device)
    if trainer.phase == "dit" and args.dit_recipe == "rollout":
        run_phase(trainer, "dit", args.dit_steps, args.dit_time_s, work_dir,
                  lambda n, at, lr_at, stop, progress: train_rollout_steps(
                      trainer.dit, trainer.wav2vec2, trainer.dit_opt, text_contexts, latent_streams, geometry, n,
                      args.dit_batch, cfg.sampler.sample_steps, cfg.sampler.shift, trainer.rng,
                      max_clips=args.rollout_max_clips, min_clips=args.rollout_min_clips, log_every=args.log_every,
                      on_log=lambda s, st: trainer.log("dit", at + s, st), lr_at=lr_at, should_stop=stop,
                      progress_at=progress, teacher_until=args.teacher_until), args.dit_lr)
    elif trainer.phase == "dit":
        run_phase(trainer, "dit", args.dit_steps, args.dit_time_s, work_dir,
                  lambda n, at, lr_at, stop, _progress: train_dit_steps(
                      trainer.dit, trainer.wav2vec2, trainer.dit_opt, text_contexts, latent_streams, geometry, n,
                      args.dit_batch, cfg.sampler.sample_steps, cfg.sampler.shift, trainer.rng, args.max_clip_index,
                      log_every=args.log_every, on_log=lambda s, st: trainer.log("dit", at + s, st),
                      lr_at=lr_at, should_stop=stop), args.dit_lr)
    write_parts(trainer, Path(args.parts_dir or work_dir / "parts"))
    write_bundle(trainer, Path(args.out))
    write_summary(trainer, work_dir)
    if args.eval_samples:
        try:
            evaluate(args.config, cfg, Path(args.out), args.eval_samples, work_dir, args.heldout_bank,
                     args.eval_clips)
        except Exception as exc:  # noqa: BLE001 - the weights are written; a failing evaluation must not lose them
            print(f"evaluation failed: {exc!r}", flush=True)
    return 0


def trainer_for_stream(cfg: AppConfig, args: argparse.Namespace, work_dir: Path) -> Trainer:
    """A trainer for the streaming decoder fine-tune: resumed from --work-dir, else the --init-from parts or the
    --init-bundle (with --fresh-decoder: its encoder, and a decoder from random weights)."""
    if not args.init_from and not args.init_bundle:
        raise SystemExit("--phases vae_stream needs --init-from PARTS_DIR or --init-bundle BUNDLE (a trained avatar)")
    trainer = Trainer(cfg, args)
    if trainer.restore(work_dir):
        if trainer.phase != "vae_stream":
            raise SystemExit(f"{work_dir / STATE_FILE} is from phase {trainer.phase}, not vae_stream: "
                             "use a fresh --work-dir")
        print(f"resumed {work_dir / STATE_FILE}: vae_stream step {trainer.step}", flush=True)
    else:
        source = args.init_from or args.init_bundle
        if args.init_from:
            read_parts(trainer, Path(args.init_from), fresh_decoder=args.fresh_decoder)
        else:
            read_bundle(trainer, Path(args.init_bundle), fresh_decoder=args.fresh_decoder)
        trainer.phase, trainer.step = "vae_stream", 0
        fresh = " (a new decoder from random weights)" if args.fresh_decoder else ""
        print(f"started from the networks in {source}: decoder on streams{fresh}", flush=True)
    return trainer


def train_vae_stream(trainer: Trainer, streams: list, args: argparse.Namespace, work_dir: Path) -> int:
    """Decoder on long streams through the carried cache, then parts, drift before/after and lip sync."""
    frames_per_clip = trainer.cfg.video.infer_frames
    encoder_before = {k: v.clone() for k, v in trainer.vae.state_dict().items() if is_encoder_side(k)}
    before_path = work_dir / "drift_before.json"
    if args.eval_samples and not before_path.exists():  # a resumed run keeps the first run's "before"
        work_dir.mkdir(parents=True, exist_ok=True)
        before_path.write_text(json.dumps(drift_rows(trainer, args), indent=1))
    run_phase(trainer, "vae_stream", args.stream_steps, args.stream_time_s, work_dir,
              lambda n, at, lr_at, stop, _progress: train_vae_stream_steps(
                  trainer.vae, trainer.vae_opt, streams, n, args.stream_batch, args.stream_clips, args.stream_burn,
                  frames_per_clip, trainer.device, trainer.rng, bptt_clips=args.stream_bptt,
                  micro_batches=trainer.micro_batches, log_every=args.log_every,
                  on_log=lambda s, st: trainer.log("vae_stream", at + s, st), lr_at=lr_at, should_stop=stop),
              args.stream_lr)
    changed = [k for k, v in trainer.vae.state_dict().items() if is_encoder_side(k) and not torch.equal(
        v, encoder_before[k])]
    if changed:
        raise RuntimeError(f"the encoder changed during the decoder fine-tune: {changed[:4]}")
    write_parts(trainer, Path(args.parts_dir or work_dir / "parts"))
    write_summary(trainer, work_dir)
    if not args.eval_samples:
        return 0
    after = drift_rows(trainer, args)
    before = json.loads(before_path.read_text())
    (work_dir / "eval_drift.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    bundle = work_dir / "eval_bundle.safetensors"  # for the evaluation only: too large to bring back
    write_bundle(trainer, bundle)
    try:
        evaluate(args.config, trainer.cfg, bundle, args.eval_samples, work_dir, args.heldout_bank, args.eval_clips)
    except Exception as exc:  # noqa: BLE001 - the weights are written; a failing evaluation must not lose them
        print(f"evaluation failed: {exc!r}", flush=True)
    return 0


def is_encoder_side(name: str) -> bool:
    """Parameters the DiT's latents depend on: the encoder and quant_conv."""
    return name.startswith(("encoder.", "quant_conv."))


def drift_rows(trainer: Trainer, args: argparse.Namespace) -> list[dict]:
    """Per-clip error through one StreamingDecoder (as served) on held-out samples, `--drift-clips` clips each."""
    from training.diagnose import streaming_drift
    from training.lip_sync_check import heldout_samples

    vae = AvatarVAE(trainer.vae.eval().requires_grad_(False))
    rows = []
    for index, sample in enumerate(heldout_samples(trainer.cfg, args.eval_samples, args.heldout_bank,
                                                   args.drift_clips)):
        rows.append({"sample": index, "clips": len(sample.frames) // trainer.cfg.video.infer_frames,
                     **streaming_drift(vae, sample, trainer.cfg.video.infer_frames, trainer.cfg.stream)})
        print(json.dumps({"drift": rows[-1]}), flush=True)
    return rows


def write_summary(trainer: Trainer, work_dir: Path) -> None:
    summary = {"elapsed_s": trainer.elapsed_s, "wall_s": round(time.perf_counter() - trainer.started, 1),
               "last": {p: [h for h in trainer.history if h["phase"] == p][-1:] for p in ("vae", "dit", "vae_stream")}}
    (work_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary), flush=True)


def networks(trainer: Trainer) -> dict[str, torch.nn.Module]:
    """The bundle's modules under the names `AvatarModels.load` fills."""
    return {"dit": trainer.dit, "vae": trainer.vae, "audio_encoder": trainer.wav2vec2,
            "text_encoder": trainer.text_encoder.model}


def write_bundle(trainer: Trainer, out: Path) -> None:
    """The four networks in one safetensors file through the project's weights module."""
    weights.save_bundle(out, networks(trainer), trainer.cfg)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)", flush=True)


def write_parts(trainer: Trainer, parts_dir: Path) -> None:
    """The networks as three smaller bundles (each under the device tool's 16 MB per returned file)."""
    parts_dir.mkdir(parents=True, exist_ok=True)
    nets = networks(trainer)
    for part, names in PARTS.items():
        weights.save_bundle(parts_dir / f"{part}.safetensors", {n: nets[n] for n in names}, trainer.cfg)


def read_parts(trainer: Trainer, parts_dir: Path, fresh_decoder: bool = False, partial: bool = False) -> None:
    """Fill the networks in place from `write_parts` output (VAE already fitted to the latent scale).

    In place (`load_state_dict`), so the parameters the optimizers hold are the ones that get trained.
    `partial`: part files that are missing are skipped (the networks keep what they hold).
    """
    from safetensors.torch import load_file

    nets = networks(trainer)
    for part, names in PARTS.items():
        path = parts_dir / f"{part}.safetensors"
        if partial and not path.exists():
            continue
        weights.bundle_config(path)  # format check with a clear message
        tensors = load_file(str(path), device=str(trainer.device))
        for name in names:
            load_network(nets[name], name, tensors, fresh_decoder)


def read_bundle(trainer: Trainer, bundle: Path, fresh_decoder: bool = False) -> None:
    """Fill every network in place from one bundle (the same architecture), e.g. the shipped one."""
    from safetensors.torch import load_file

    weights.bundle_config(bundle)  # format check with a clear message
    tensors = load_file(str(bundle), device=str(trainer.device))
    for name, module in networks(trainer).items():
        load_network(module, name, tensors, fresh_decoder)


def load_network(module: torch.nn.Module, name: str, tensors: dict[str, torch.Tensor], fresh_decoder: bool) -> None:
    """One network's tensors (`name.` prefix) into `module`; with `fresh_decoder` the VAE takes only its encoder
    side (the DiT's latents stay as trained) and keeps its decoder side as built (random, any width)."""
    prefix = f"{name}."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if not (fresh_decoder and name == "vae"):
        module.load_state_dict(state)
        return
    missing, unexpected = module.load_state_dict({k: v for k, v in state.items() if is_encoder_side(k)}, strict=False)
    if unexpected or any(is_encoder_side(k) for k in missing):
        raise RuntimeError(f"the VAE's encoder side does not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")


def evaluate(config: str | None, cfg: AppConfig, bundle: Path, count: int, work_dir: Path,
             heldout_bank: str | None = None, max_clips: int | None = None) -> None:
    """Lip sync on held-out speakers through the normal loader and the streaming avatar (and the VAE alone)."""
    from training.diagnose import row, vae_round_trip
    from training.lip_sync_check import generate_frames, heldout_samples, score_video

    eval_cfg = load_config(config, {"model.vae.decoder_base_dim": cfg.model.vae.decoder_base_dim,
                                    "model.checkpoint": str(bundle), "runtime.device": cfg.runtime.device})
    models = AvatarModels.load(eval_cfg)
    avatar = StreamingAvatar(models, eval_cfg)
    rows = []
    for index, sample in enumerate(heldout_samples(eval_cfg, count, heldout_bank, max_clips)):
        truth = (sample.opening, sample.mouth_box, sample.reference)
        recon = vae_round_trip(models.vae, sample, eval_cfg.video.infer_frames, stream=eval_cfg.stream)
        frames = generate_frames(avatar, sample.reference, sample.audio, eval_cfg.server.prompt)
        rows += [{"sample": index, **row("vae", score_video(recon, *truth))},
                 {"sample": index, **row("model", score_video(frames, *truth))}]
        print(json.dumps(rows[-2:]), flush=True)
    (work_dir / "eval.json").write_text(json.dumps(rows, indent=1))


def evaluate_vae(trainer: Trainer, args: argparse.Namespace, work_dir: Path) -> None:
    """Lip sync of the trained VAE's round trip (encode + streaming decode) on held-out samples."""
    from training.diagnose import row, vae_round_trip
    from training.lip_sync_check import heldout_samples, score_video

    try:
        vae = AvatarVAE(trainer.vae.eval())
        rows = []
        for index, sample in enumerate(heldout_samples(trainer.cfg, args.eval_samples, args.heldout_bank,
                                                       args.eval_clips)):
            recon = vae_round_trip(vae, sample, trainer.cfg.video.infer_frames, stream=trainer.cfg.stream)
            rows.append({"sample": index, **row("vae", score_video(recon, sample.opening, sample.mouth_box,
                                                                    sample.reference))})
            print(json.dumps(rows[-1]), flush=True)
        (work_dir / "eval_vae.json").write_text(json.dumps(rows, indent=1))
    except Exception as exc:  # noqa: BLE001 - the weights are written; a failing evaluation must not lose them
        print(f"VAE evaluation failed: {exc!r}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train the tiny avatar bundle on synthetic talking faces.")
    p.add_argument("--config", default=None, help="preset to train (default configs/tiny.yaml)")
    p.add_argument("--out", default="model/assets/tiny_avatar.safetensors")
    p.add_argument("--work-dir", default="artifacts/train_tiny", help="resumable state and logs")
    p.add_argument("--speech-bank", default="artifacts/train_tiny/speech_bank.npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-utterances", type=int, default=160)
    p.add_argument("--num-streams", type=int, default=320)
    p.add_argument("--num-identities", type=int, default=96, help="train faces (the standard split has 24)")
    p.add_argument("--phases", choices=("all", "vae", "vae_stream"), default="all",
                   help="vae: stop after the VAE (and its latent fit), writing the part bundles; vae_stream: "
                        "fine-tune the decoder of --init-from's bundle on long streams (encoder frozen)")
    p.add_argument("--wall-s", type=float, default=float("inf"), help="wall-clock budget of this process")
    p.add_argument("--reserve-s", type=float, default=40.0,
                   help="of --wall-s, kept for writing and evaluating after training stops")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-time-s", type=float, default=float("inf"))
    p.add_argument("--vae-batch", type=int, default=48)
    p.add_argument("--vae-frames", type=int, default=12, help="talking frames per VAE example (multiple of 4)")
    p.add_argument("--vae-lr", type=float, default=1.5e-3, help="peak (warm-up, then cosine)")
    p.add_argument("--dit-steps", type=int, default=4000)
    p.add_argument("--dit-time-s", type=float, default=float("inf"))
    p.add_argument("--dit-batch", type=int, default=96)
    p.add_argument("--dit-lr", type=float, default=8e-4, help="peak (warm-up, then cosine)")
    p.add_argument("--dit-recipe", choices=("rollout", "teacher"), default="rollout",
                   help="rollout: on the model's own rollouts under the reference scheme (training/self_forcing.py); "
                        "teacher: one clip at a time on true context (the earlier scheme's recipe)")
    p.add_argument("--rollout-max-clips", type=int, default=8, help="rollout: most clips per rollout")
    p.add_argument("--rollout-min-clips", type=int, default=2, help="rollout: fewest clips per rollout")
    p.add_argument("--teacher-until", type=float, default=0.3,
                   help="rollout: share of the phase by which rollouts on true latents fall to 10 percent")
    p.add_argument("--photo-bank", default=None, help="photographs (training.photos) for backdrops and still streams")
    p.add_argument("--varied-share", type=float, default=0.75, help="train faces drawn varied (the rest classic)")
    p.add_argument("--drawn-share", type=float, default=0.06, help="streams of the server's drawn face talking")
    p.add_argument("--photo-share", type=float, default=0.06, help="streams of a photograph that must stay unchanged")
    p.add_argument("--init-bundle", default=None,
                   help="a bundle every network starts from (e.g. the shipped one) instead of random weights: the "
                        "VAE phase fine-tunes its VAE and hands its DiT and encoders on to the DiT phase")
    p.add_argument("--stream-steps", type=int, default=3000, help="vae_stream: decoder steps")
    p.add_argument("--stream-time-s", type=float, default=float("inf"))
    p.add_argument("--stream-batch", type=int, default=16, help="vae_stream: streams per step")
    p.add_argument("--stream-clips", type=int, default=6, help="vae_stream: clips per stream with gradients")
    p.add_argument("--stream-burn", type=int, default=3,
                   help="vae_stream: up to this many clips decoded first without gradients (deeper caches)")
    p.add_argument("--stream-bptt", type=int, default=0,
                   help="vae_stream: clips per backward, cache detached between (0: through all clips)")
    p.add_argument("--stream-lr", type=float, default=3e-4, help="vae_stream: peak (warm-up, then cosine)")
    p.add_argument("--drift-clips", type=int, default=8, help="vae_stream: clips per held-out drift sample")
    p.add_argument("--latent-fit-videos", type=int, default=64, help="videos the latent statistics are fitted on")
    p.add_argument("--max-clip-index", type=int, default=6)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--parts-dir", default=None, help="where the three part bundles go (default WORK_DIR/parts)")
    p.add_argument("--init-from", default=None, help="part bundles to start DiT training from (skips the VAE)")
    p.add_argument("--bundle-only", action="store_true",
                   help="with --init-from: only write --out and stop (with --init-bundle too: parts missing from "
                        "--init-from come from that bundle)")
    p.add_argument("--fresh-decoder", action="store_true",
                   help="the VAE's decoder side starts from random weights, not from --init-bundle/--init-from "
                        "(their encoder is kept): a decoder of another width, with --set model.vae.decoder_base_dim=N")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config key of --config changed for this run (repeatable), e.g. model.vae.decoder_base_dim=8")
    p.add_argument("--eval-samples", type=int, default=0, help="held-out samples to score after training")
    p.add_argument("--eval-clips", type=int, default=None, help="score only the first N clips of each sample")
    p.add_argument("--heldout-bank", default=None,
                   help="held-out speech saved by `training.lip_sync_check --save-bank` (machines without espeak-ng)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)
    args.t0 = started
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest 3D-conv kernels once
    return train(args)


if __name__ == "__main__":
    raise SystemExit(main())
