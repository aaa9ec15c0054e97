#!/usr/bin/env python3
"""The server's model path on one GPU, several settings in one process: load once, then per variant a warm-up
session and a measured session through `server.engine.ModelEngine`, and optionally a profile of one clip.

    python3 bench/engine_gpu.py --config configs/liveavatar_14b.yaml --random_weights --set video.fps 25 \
        --set runtime.fp8 gemm --variant per_step sampler.kv_update=per_step \
        --variant per_step_kv8 sampler.kv_update=per_step,runtime.kv_cache_dtype=float8 --profile per_step
    python3 bench/engine_gpu.py --dry       # CPU, tiny config: catches mistakes before a device call

What one variant may change without reloading the weights: `sampler.*`, `stream.*`, `video.fps`,
`runtime.kv_cache_dtype` (caches made after it), `runtime.attention_backend` and the VAE decode options (`runtime.vae_decode_chunk`,
`vae_channels_last`, `cudnn_benchmark`; channels-last stays on once set, so such variants come last).
A clip is what a live session gets: the window's audio features (wav2vec2), the DiT's blocks, the decode of
each block and its frames as uint8 on the host, handed to the session part by part. Per variant: the
warm-up session's clip times (compilation happens there), then a fresh session's clips: TTFF = its first
clip's first part (warm process, new session), steady FPS = frames per clip / median clip time of the
others, peak GPU memory allocated per clip (flat over the session when the first and last agree).
`--profile NAME` runs one more clip of that variant under the torch profiler (on this thread, the same
calls as the engine's worker) and splits its GPU time into GEMMs, attention, norms/elementwise (the
compiled blocks' fused kernels included), copies, audio features, VAE decode and idle.
Prints `ENGINE {json}` per variant and `PROFILE {json}`, a table last; JSON lines also to $OUT/engine_gpu.jsonl.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import AppConfig, load_config
from model.io_types import AudioWindow

H200_BF16_DENSE_TFLOPS = 989.0  # vendor datasheet, dense bf16
H200_FP8_DENSE_TFLOPS = 1979.0  # vendor datasheet, dense float8
VAE_RUNTIME_KEYS = ("runtime.vae_decode_chunk", "runtime.vae_channels_last", "runtime.cudnn_benchmark")


def parse_variant(name: str, spec: str) -> tuple[str, dict[str, str]]:
    """'a.b=1,c.d=x' -> {'a.b': '1', 'c.d': 'x'} (empty spec: the base settings)."""
    overrides = {}
    for item in filter(None, spec.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {name}: {item!r} is not KEY=VALUE")
        overrides[key.strip()] = value.strip()
    return name, overrides


# ----------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gb(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0


def _windows(fmt, clips: int, seed: int) -> list[AudioWindow]:
    """`clips` windows of low noise in the shape `fmt` (a StreamFormat or a StreamingAvatar) asks for."""
    rng = np.random.default_rng(seed)
    windows = []
    for k in range(clips):
        samples = (0.05 * rng.standard_normal(fmt.context_samples + fmt.clip_samples)).astype(np.float32)
        windows.append(AudioWindow(samples, fmt.context_samples, k * fmt.clip_samples / fmt.sample_rate_hz, k))
    return windows


async def _session(engine, fmt, cfg: AppConfig, clips: int, device: torch.device, name: str) -> dict:
    """One session through the engine: per clip the time from window in to last part out, first part, peak."""
    image = np.random.default_rng(1).integers(0, 255, (*fmt.frame_size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    await engine.start(name, image, cfg.server.prompt)
    start_s = time.perf_counter() - t0
    clip_s, first_part_s, peaks = [], [], []
    for window in _windows(fmt, clips, seed=len(name)):
        _reset_peak(device)
        parts: list[tuple[float, int]] = []
        t = time.perf_counter()
        await engine.submit(name, window,
                            on_part=lambda part, parts=parts: parts.append((time.perf_counter(), len(part.frames))))
        clip_s.append(time.perf_counter() - t)
        first_part_s.append(parts[0][0] - t)
        peaks.append(round(_peak_gb(device), 2))
        assert sum(n for _, n in parts) == fmt.frames_per_clip, parts
    await engine.stop(name)
    return {"start_s": start_s, "clip_s": clip_s, "first_part_s": first_part_s, "peak_gb": peaks}


# ----------------------------------------------------------------------------- the profile


@contextmanager
def _annotated(obj, attr: str, label: str):
    """Wrap obj.attr in a profiler range named `label` (the kernels it launches are counted under it)."""
    own = attr in vars(obj)  # a class's own method (restored), or an instance's (the wrapper is deleted)
    original = getattr(obj, attr)

    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    setattr(obj, attr, wrapped)
    try:
        yield
    finally:
        if own:
            setattr(obj, attr, original)
        else:
            delattr(obj, attr)


KERNEL_CLASSES = (  # first match wins; names lower-cased
    ("attention", ("sdpa", "fmha", "flash", "attention", "attn")),
    ("GEMMs", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "scaled_mm", "matmul", "wgmma")),
    ("copies", ("copy", "memcpy", "memset", "catarray", "cat_", "fill")),
)


def classify_kernel(name: str) -> str:
    low = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(k in low for k in keys):
            return label
    return "norms/elementwise (incl. compiled fused kernels)"


def split_profile(prof, span_s: float) -> dict:
    """GPU seconds per class: kernels under the 'vae_decode' / 'audio_features' ranges, then by kernel name."""
    totals: dict[str, float] = {}
    top: dict[str, list] = {}

    def visit(event, under: str | None) -> None:
        label = event.name if event.name in ("vae_decode", "audio_features") else under
        for kernel in event.kernels:
            cls = {"vae_decode": "VAE decode", "audio_features": "audio features"}.get(label) or classify_kernel(
                kernel.name)
            totals[cls] = totals.get(cls, 0.0) + kernel.duration / 1e6
            entry = top.setdefault(kernel.name[:90], [cls, 0.0])
            entry[1] += kernel.duration / 1e6
        for child in event.cpu_children:
            visit(child, label)

    for event in prof.events():
        if event.cpu_parent is None and event.device_type == torch.autograd.DeviceType.CPU:
            visit(event, None)
    busy = sum(totals.values())
    totals["idle (GPU waiting: host, syncs)"] = max(0.0, span_s - busy)
    heaviest = sorted(top.items(), key=lambda kv: -kv[1][1])[:15]
    return {"span_s": span_s, "kernel_s": busy, "classes_s": totals,
            "top_kernels": [{"name": n, "class": c, "s": s} for n, (c, s) in heaviest]}


def profile_clip(models, cfg: AppConfig, device: torch.device, warm_clips: int) -> dict:
    """One steady clip of a fresh session (after `warm_clips`), profiled, on this thread."""
    from torch.profiler import ProfilerActivity, profile

    from model.stream import avatar as avatar_module

    avatar = avatar_module.StreamingAvatar(models, cfg, seed=cfg.runtime.seed)
    image = np.random.default_rng(2).integers(0, 255, (*avatar.frame_size, 3), dtype=np.uint8)
    avatar.start(image, cfg.server.prompt)
    windows = _windows(avatar, warm_clips + 1, seed=7)
    for window in windows[:-1]:
        for _ in avatar.clip_parts(window):
            pass
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with _annotated(avatar_module.StreamingAvatar, "decode_clip", "vae_decode"), \
            _annotated(models.audio_encoder, "encode_window", "audio_features"):
        _sync(device)
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            frames = sum(len(part.frames) for part in avatar.clip_parts(windows[-1]))
            _sync(device)
            span_s = time.perf_counter() - t0
    avatar.close()
    assert frames == avatar.frames_per_clip
    out = split_profile(prof, span_s)
    if os.environ.get("OUT"):  # the trace, gzipped (a 14B clip's trace is tens of MB as text)
        import gzip
        import shutil

        raw = Path(os.environ["OUT"]) / "engine_clip_trace.json"
        prof.export_chrome_trace(str(raw))
        with raw.open("rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    return out


def dit_clip_flops(models, cfg: AppConfig) -> float:
    """FLOPs of the DiT for one steady clip (blocks eager under the counter, as bench/gpu_bench.py counts)."""
    from bench.gpu_bench import count_flops
    from model.stream.avatar import StreamingAvatar

    avatar = StreamingAvatar(models, cfg, seed=cfg.runtime.seed)
    avatar.start(np.full((*avatar.frame_size, 3), 100, np.uint8), cfg.server.prompt)
    windows = _windows(avatar, 2, seed=3)
    avatar.denoise_clip(windows[0])  # window filled: the counted clip attends to the full window
    flops = count_flops(lambda: avatar.denoise_clip(windows[1]), models.dit)
    avatar.close()
    return flops


def window_bytes(models, cfg: AppConfig, device: torch.device) -> dict:
    """Bytes of one KV window (a `StreamCache` after its first prefill) per `runtime.kv_cache_dtype`, and
    what the allocator holds for it: the per-step scheme keeps `sample_steps` of them per session."""
    from model.vae.streaming import SPACE_STRIDE

    dit, d = models.dit, cfg.model.dit
    h, w = cfg.video.height // SPACE_STRIDE, cfg.video.width // SPACE_STRIDE
    ref = torch.zeros(1, d.in_channels, 1, h, w, device=device, dtype=models.dtype)
    text = torch.zeros(1, d.text_len, d.text_dim, device=device, dtype=models.dtype)
    kept, out = dit.kv_cache_dtype, {}
    try:
        for kind in ("model", "float8"):
            dit.kv_cache_dtype = kind
            _sync(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            cache = dit.new_cache(1, device, models.dtype)
            with torch.inference_mode():
                dit.prefill(cache, ref, text)
            _sync(device)
            held = (torch.cuda.memory_allocated(device) - before) if device.type == "cuda" else 0
            out[kind] = {"cache_gb": cache.nbytes() / 2**30, "allocated_gb": held / 2**30,
                         "kv_gb": (cache.kv_k.nbytes + cache.kv_v.nbytes) / 2**30,
                         "text_gb": (cache.text_k.nbytes + cache.text_v.nbytes) / 2**30}
            cache.clear()
    finally:
        dit.kv_cache_dtype = kept
    return out


# ----------------------------------------------------------------------------- main


def apply_variant(models, cfg: AppConfig, overrides: dict) -> None:
    """Settings a loaded model can change: the cache storage, the attention kernel, the VAE decode options."""
    from model.net.attention import set_attention_backend

    models.dit.kv_cache_dtype = cfg.runtime.kv_cache_dtype
    set_attention_backend(cfg.runtime.attention_backend)  # read per call, inside the compiled blocks' opaque op
    models.vae.apply_runtime(cfg.runtime)


async def run(args, base: dict, variants: list[tuple[str, dict]], emit) -> None:
    from model.stream.avatar import AvatarModels
    from server.engine import ModelEngine

    cfg0 = load_config(args.config, base)
    device = torch.device(cfg0.runtime.device)
    t0 = time.perf_counter()
    models = AvatarModels.load(cfg0)
    _sync(device)
    emit("LOAD", {"load_s": time.perf_counter() - t0, "peak_gb": round(_peak_gb(device), 2),
                  "fp8": cfg0.runtime.fp8, "compile": cfg0.runtime.compile, "size": cfg0.video.size})
    if args.window_bytes:
        emit("WINDOW", window_bytes(models, cfg0, device))
    flops = None
    for name, overrides in variants:
        cfg = load_config(args.config, {**base, **overrides})
        apply_variant(models, cfg, overrides)
        engine = ModelEngine(cfg, models=models)
        await engine.load()
        fmt = engine.stream_format
        _sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        warm = await _session(engine, fmt, cfg, args.warmup, device, f"{name}-warm")
        measured = await _session(engine, fmt, cfg, args.clips, device, f"{name}-measured")
        await engine.close()
        steady = measured["clip_s"][1:] or measured["clip_s"]
        row = {"variant": name, "overrides": overrides, "kv_update": cfg.sampler.kv_update,
               "kv_cache_dtype": cfg.runtime.kv_cache_dtype, "fp8": cfg.runtime.fp8, "compile": cfg.runtime.compile,
               "fps_video": cfg.video.fps, "frames_per_clip": fmt.frames_per_clip, "size": cfg.video.size,
               "steps": cfg.sampler.sample_steps, "warmup_clip_s": warm["clip_s"],
               "clip_s": measured["clip_s"], "first_part_s": measured["first_part_s"],
               "ttff_s": measured["first_part_s"][0], "session_start_s": measured["start_s"],
               "fps": fmt.frames_per_clip / statistics.median(steady), "peak_gb": measured["peak_gb"],
               "realtime_x": fmt.frames_per_clip / cfg.video.fps / statistics.median(steady)}
        if args.flops and flops is None and name == args.flops:
            flops = dit_clip_flops(models, cfg)
            row["dit_flops_per_clip"] = flops
        emit("ENGINE", row)
        if name == args.profile:
            prof = profile_clip(models, cfg, device, warm_clips=1)
            prof["variant"] = name
            dit_s = 0.0
            if flops:
                dit_s = sum(s for c, s in prof["classes_s"].items()
                            if c not in ("VAE decode", "audio features") and not c.startswith("idle"))
                prof["dit_kernel_s"] = dit_s
            if dit_s > 0:  # a CPU rehearsal records no kernels
                prof["mfu_bf16_peak"] = flops / dit_s / (H200_BF16_DENSE_TFLOPS * 1e12)
                prof["mfu_fp8_peak"] = flops / dit_s / (H200_FP8_DENSE_TFLOPS * 1e12)
            emit("PROFILE", prof)


def print_table(rows: list[dict], profiles: list[dict]) -> None:
    print("| variant | kv_update | KV cache | fp8 | FPS (steady) | x real time | TTFF s | clip s (measured) "
          "| warm-up clip s | peak GB per clip |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['kv_update']} | {r['kv_cache_dtype']} | {r['fp8']} | {r['fps']:.2f} | "
              f"{r['realtime_x']:.2f} | {r['ttff_s']:.2f} | {' / '.join(f'{s:.2f}' for s in r['clip_s'])} | "
              f"{' / '.join(f'{s:.1f}' for s in r['warmup_clip_s'])} | "
              f"{r['peak_gb'][0]:.1f} -> {r['peak_gb'][-1]:.1f} |")
    for p in profiles:
        print(f"\nprofile of one steady clip ({p['variant']}): span {p['span_s']:.3f} s, kernels {p['kernel_s']:.3f} s"
              + (f", DiT MFU {100 * p['mfu_bf16_peak']:.0f}% of bf16 / {100 * p['mfu_fp8_peak']:.0f}% of fp8 peak"
                 if "mfu_bf16_peak" in p else ""))
        print("| class | GPU s | share of the clip |\n|---|---|---|")
        for cls, s in sorted(p["classes_s"].items(), key=lambda kv: -kv[1]):
            print(f"| {cls} | {s:.3f} | {100 * s / p['span_s']:.0f}% |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/liveavatar_14b.yaml")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--variant", nargs=2, action="append", default=[], metavar=("NAME", "KEY=VALUE,..."))
    p.add_argument("--clips", type=int, default=4, help="clips of the measured session")
    p.add_argument("--warmup", type=int, default=2, help="clips of the warm-up session before it")
    p.add_argument("--profile", default=None, help="variant whose one extra clip is profiled")
    p.add_argument("--flops", default=None, help="variant whose DiT FLOPs per clip are counted (MFU)")
    p.add_argument("--random_weights", action="store_true", help="ignore the config's checkpoint")
    p.add_argument("--window_bytes", action="store_true", help="measure one KV window's bytes per cache dtype")
    p.add_argument("--dry", action="store_true", help="CPU, tiny config at 64x64: the same steps, quickly")
    args = p.parse_args(argv)
    base = dict(args.set)
    if args.random_weights:
        base["model.checkpoint"] = None
    if args.dry:
        args.config = "configs/tiny.yaml"
        base.update({"runtime.device": "cpu", "runtime.dtype": "float32", "video.size": "64*64",
                     "runtime.compile": "false", "model.checkpoint": None})
        base.pop("runtime.fp8", None)
        base.pop("model.text_encoder.tokenizer", None)
        base.pop("model.text_encoder.num_layers", None)
        base.pop("runtime.text_encoder_device", None)
    variants = [parse_variant(n, s) for n, s in args.variant] or [("base", {})]
    for name, overrides in variants:
        load_config(args.config, {**base, **overrides})  # a bad key or value stops here, naming the flag
    out = Path(os.environ.get("OUT", "/tmp")) / "engine_gpu.jsonl"
    rows, profiles = [], []

    def emit(kind: str, row: dict) -> None:
        print(f"{kind} {json.dumps(row)}", flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps({"kind": kind, **row}) + "\n")
        (rows if kind == "ENGINE" else profiles if kind == "PROFILE" else []).append(row)

    asyncio.run(run(args, base, variants, emit))
    print_table(rows, profiles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
