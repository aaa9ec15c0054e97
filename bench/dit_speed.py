#!/usr/bin/env python3
"""DiT and VAE-decode speed options on one GPU, one change at a time, each checked against plain eager.

    python3 bench/dit_speed.py --variants eager,fuse_qkv,cudnn,flash --vae      # ~4 min on one H200
    python3 bench/dit_speed.py --variants eager,compile,compile_fused           # ~6 min (compile warm-up)
    python3 bench/dit_speed.py --dry                                            # CPU, tiny config, ~2 min

Random bf16 weights of the configured size (the 14B preset by default; --set overrides any config key).
One "clip" is what `StreamingAvatar` runs: a sink prefill, then per block `sample_steps` denoiser calls
and one commit (48 frames at 704x384: 4 blocks, 16 + 4 + 1 passes). Every variant starts a fresh stream
from the same seed, so its first clip's latents compare with the eager variant's (`rel_err`). DiT time
is CUDA-event time over the measured clips; `warmup_s` is the first clip's wall time (compilation).
Rows are printed and appended as JSON lines to $OUT/dit_speed.jsonl (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import AppConfig, load_config
from model.net import attention as attention_seam
from model.net.dit import AvatarDiT
from model.stream.sampler import FlowMatchSchedule, denoise_block
from model.vae.streaming import AvatarVAE, build_vae
from model.weights.checkpoint import fill_random

# name -> runtime overrides; variants that change the weights (fusion) run after those that do not
DIT_VARIANTS = {
    "eager": {},
    "cudnn": {"runtime.attention_backend": "cudnn"},
    "flash": {"runtime.attention_backend": "flash"},
    "efficient": {"runtime.attention_backend": "efficient"},
    "compile": {"runtime.compile": True},
    "compile_autotune": {"runtime.compile": True, "runtime.compile_mode": "max-autotune-no-cudagraphs"},
    "fuse_qkv": {"runtime.fuse_qkv": True},
    "compile_fused": {"runtime.compile": True, "runtime.fuse_qkv": True},
    # float8 layers replace the bf16 ones for good: these come after every bf16 variant
    "fp8_weights": {"runtime.fp8": "weights"},
    "fp8_gemm": {"runtime.fp8": "gemm"},
    "fp8_gemm_compile": {"runtime.fp8": "gemm", "runtime.compile": True},
}
# name -> VAE runtime overrides; channels_last and cudnn benchmark are one-way, so they come last
VAE_VARIANTS = {
    "chunk1": {"runtime.vae_decode_chunk": 1},
    "chunk3": {"runtime.vae_decode_chunk": 3},
    "chunk12": {"runtime.vae_decode_chunk": 12},
    "chunk12_cudnn_benchmark": {"runtime.vae_decode_chunk": 12, "runtime.cudnn_benchmark": True},
    "chunk12_channels_last": {"runtime.vae_decode_chunk": 12, "runtime.cudnn_benchmark": True,
                              "runtime.vae_channels_last": True},
}


def random_dit(cfg: AppConfig, device: torch.device, dtype: torch.dtype) -> AvatarDiT:
    """The DiT built on meta, cast, then filled on the device one parameter at a time (no float32 copy)."""
    with torch.device("meta"):
        dit = AvatarDiT(cfg.model.dit)
    dit.cast(dtype)
    fill_random(dit, device, seed=cfg.runtime.seed)
    return dit.eval().requires_grad_(False)


class Stream:
    """Random inputs of the real shapes and the clip loop of `StreamingAvatar` (DiT only)."""

    def __init__(self, dit: AvatarDiT, cfg: AppConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.dit, self.cfg, self.device, self.dtype = dit, cfg, device, dtype
        d = cfg.model.dit
        self.h, self.w = cfg.video.height // 8, cfg.video.width // 8
        self.f = d.num_frames_per_block
        self.blocks = cfg.video.infer_frames // 4 // self.f
        self.schedule = FlowMatchSchedule(cfg.sampler.sample_steps, cfg.sampler.shift)
        gen = torch.Generator(device=device).manual_seed(cfg.runtime.seed + 1)
        self.ref = torch.randn(1, 16, 1, self.h, self.w, device=device, generator=gen, dtype=dtype)
        self.text = torch.randn(1, min(64, d.text_len), d.text_dim, device=device, generator=gen, dtype=dtype)
        self.audio = torch.randn(1, 4 * self.f * self.blocks, d.num_audio_layers, d.audio_dim, device=device,
                                 generator=gen, dtype=dtype)
        self.cache = dit.new_cache(1, device, dtype)
        self.next_frame = 0
        self.clips = 0

    def clip(self) -> torch.Tensor:
        gen = torch.Generator(device=self.device).manual_seed(1000 + self.clips)
        self.dit.prefill(self.cache, self.ref, self.text)  # the motion context's sink has a fixed size
        latents = []
        for b in range(self.blocks):
            audio = self.audio[:, b * 4 * self.f:(b + 1) * 4 * self.f]
            start = self.next_frame
            noise = torch.randn(1, 16, self.f, self.h, self.w, device=self.device, generator=gen, dtype=self.dtype)
            block = denoise_block(lambda x, t, a=audio, s=start: self.dit(x, t, a, self.cache, s), noise,
                                  self.schedule).latents
            self.dit.commit(self.cache, block, audio, start)
            self.next_frame += self.f
            latents.append(block)
        self.clips += 1
        return torch.cat(latents, dim=2)


def timed(fn, device: torch.device) -> tuple[object, float]:
    """(result, seconds): CUDA events on a GPU, wall time on the CPU."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1000


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def run_dit(args, base: dict, device, dtype, emit) -> None:
    cfg = load_config(args.config, base)
    dit = random_dit(cfg, device, dtype)
    reference = None
    names = [n for n in DIT_VARIANTS if n in args.variants]  # fixed order: one-way changes last
    for name in names:
        vcfg = load_config(args.config, {**base, **DIT_VARIANTS[name]})
        attention_seam.set_attention_backend("auto")
        dit.compile_blocks(backend=None)
        if vcfg.runtime.compile:
            dit.compile_blocks(backend=args.compile_backend, mode=vcfg.runtime.compile_mode)
        dit.apply_runtime(_without_compile(vcfg))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.inference_mode():
            stream = Stream(dit, vcfg, device, dtype)
            t0 = time.perf_counter()
            first = stream.clip()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            warmup_s = time.perf_counter() - t0
            if reference is None:
                reference = first
            err = rel_err(first, reference)
            times = [timed(stream.clip, device)[1] for _ in range(args.clips)]
        row = {"what": "dit", "variant": name, "overrides": DIT_VARIANTS[name],
               "dit_s_per_clip": sum(times) / len(times), "clips": len(times), "warmup_s": warmup_s,
               "rel_err_vs_first": err, "layers": cfg.model.dit.num_layers, "size": cfg.video.size,
               "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0}
        emit(row)
        del stream


def _without_compile(cfg: AppConfig) -> object:
    """The runtime section with compile off (the script compiles itself, with --compile_backend)."""
    import dataclasses

    return dataclasses.replace(cfg.runtime, compile=False)


def run_vae(args, base: dict, device, dtype, emit) -> None:
    cfg = load_config(args.config, base)
    torch.manual_seed(cfg.runtime.seed)
    with torch.device(device):
        module = build_vae(cfg.model.vae)
    vae = AvatarVAE(module.to(device=device, dtype=dtype))
    h, w = cfg.video.height // 8, cfg.video.width // 8
    latent_frames = cfg.video.infer_frames // 4
    gen = torch.Generator(device=device).manual_seed(7)
    prime = torch.randn(1, 16, 1, h, w, device=device, generator=gen, dtype=dtype)
    clips = [torch.randn(1, 16, latent_frames, h, w, device=device, generator=gen, dtype=dtype)
             for _ in range(args.clips + 1)]
    reference = None
    for name in [n for n in VAE_VARIANTS if n in args.vae_variants]:
        vcfg = load_config(args.config, {**base, **VAE_VARIANTS[name]})
        vae.apply_runtime(vcfg.runtime)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        decoder = vae.new_decoder(prime)
        t0 = time.perf_counter()
        first = decoder.decode(clips[0])
        first_host = first.float().cpu()  # the one host copy per clip, as the pipeline's frames
        warmup_s = time.perf_counter() - t0
        reference = first_host if reference is None else reference
        times = [timed(lambda c=c, d=decoder: d.decode(c).cpu(), device)[1] for c in clips[1:]]
        emit({"what": "vae", "variant": name, "overrides": VAE_VARIANTS[name],
              "vae_s_per_clip": sum(times) / len(times), "clips": len(times), "warmup_s": warmup_s,
              "max_abs_err_vs_first": float((first_host - reference).abs().max()), "size": cfg.video.size,
              "peak_gb": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0})
        decoder.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/liveavatar_14b.yaml")
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"))
    p.add_argument("--variants", default="eager,fuse_qkv,cudnn,flash", help=f"DiT: {','.join(DIT_VARIANTS)}")
    p.add_argument("--vae", action="store_true", help="also time the VAE decode variants")
    p.add_argument("--vae_variants", default=",".join(VAE_VARIANTS), help=f"VAE: {','.join(VAE_VARIANTS)}")
    p.add_argument("--clips", type=int, default=2, help="measured clips per variant (after one warm-up clip)")
    p.add_argument("--compile_backend", default="inductor")
    p.add_argument("--dry", action="store_true", help="CPU, tiny config, float32, aot_eager: catches mistakes")
    p.add_argument("--out", default=None, help="JSON lines file (default $OUT/dit_speed.jsonl)")
    args = p.parse_args(argv)
    base = dict(args.set)
    if args.dry:
        args.config, args.compile_backend, args.clips = "configs/tiny.yaml", "aot_eager", 1
        base.update({"runtime.device": "cpu", "runtime.dtype": "float32", "model.checkpoint": None})
    args.variants = [v for v in args.variants.split(",") if v]
    args.vae_variants = [v for v in args.vae_variants.split(",") if v]
    bad = [v for v in args.variants if v not in DIT_VARIANTS] + [v for v in args.vae_variants if v not in VAE_VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}; DiT: {list(DIT_VARIANTS)}, VAE: {list(VAE_VARIANTS)}")
    cfg = load_config(args.config, base)
    device, dtype = torch.device(cfg.runtime.device), getattr(torch, cfg.runtime.dtype)
    out = Path(args.out or Path(os.environ.get("OUT", "/tmp")) / "dit_speed.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    print("INFO " + json.dumps(info), flush=True)

    def emit(row: dict) -> None:
        row.update(info)
        print("SPEED " + json.dumps(row), flush=True)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    if args.variants:
        run_dit(args, base, device, dtype, emit)
    if args.vae:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        run_vae(args, base, device, dtype, emit)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
