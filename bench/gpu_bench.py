#!/usr/bin/env python3
"""Streaming DiT + online VAE decode benchmark: s/clip, sustained FPS, TTFF, latency, MFU, peak memory.

One process per GPU, started like the server:

    python bench/gpu_bench.py --config configs/liveavatar_14b.yaml --clips 12                 # 1 GPU
    torchrun --nproc-per-node 2 bench/gpu_bench.py --config configs/liveavatar_14b.yaml     # Ulysses SP=2
    torchrun --nproc-per-node 2 bench/gpu_bench.py --vae_mode rank ...                      # DiT GPU + VAE GPU
    torchrun --nproc-per-node 4 bench/gpu_bench.py --set parallel.mode tpp --set sampler.kv_update per_step
    python bench/gpu_bench.py --config configs/tiny.yaml --device cpu --clips 3             # dry run

The DiT runs with random weights at the configured size, built on the meta device and filled on the
GPU (never materialised on the CPU), and makes exactly the calls `StreamingAvatar` makes per clip
(`model.stream.avatar.generate_block` and `MotionHistory`): a sink prefill with the previous clip as
motion, then per block `sample_steps` denoiser calls (and, for kv_update clean_pass, one commit).
Under parallel.mode tpp rank 0 drives `model.parallel.tpp.TppDriver` (one GPU per step) and keeps the pipeline
full by handing over the next clip's window once the current clip's first block is out. Frames leave
block by block (`clip_parts`): TTFF is the first block's frames on the host. Audio features and text
context are random tensors of the real shapes (their encoders run once per clip / per session, off the
DiT's critical path). `--kv_update a,b` and `--vae_mode a,b` measure one session per combination in
one process (the weights are built once). Rank 0 prints one JSON line per session, prefixed `RESULT `;
`bench/table.py` turns those lines into the table for BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.config import AppConfig, load_config, replace_key
from model.net.dit import AvatarDiT
from model.net.motion import MOTION_LATENT_FRAMES
from model.parallel import group as parallel
from model.stream.avatar import MotionHistory, copy_sink, generate_block
from model.stream.sampler import FlowMatchSchedule, KVUpdate
from model.vae.streaming import SPACE_STRIDE, TIME_STRIDE, AvatarVAE, build_vae
from model.weights.checkpoint import fill_random

H200_BF16_DENSE_TFLOPS = 989.0  # vendor datasheet, dense bf16 (MFU denominator)
VAE_MODES = ("inline", "stream", "rank")


# ----------------------------------------------------------------------------- building


def build_dit(cfg: AppConfig, group: parallel.ParallelGroup, dtype: torch.dtype, shard_weights: bool) -> AvatarDiT:
    """The DiT on the meta device, cast, optionally sharded per layer, then filled on this rank's GPU."""
    with torch.device("meta"):
        dit = AvatarDiT(cfg.model.dit)
    dit.cast(dtype)
    # float8 layers swapped in on meta, before sharding: the ranks then shard and gather float8 bits
    if getattr(cfg.runtime, "fp8", "none") != "none":
        dit.quantize_fp8(cfg.runtime.fp8)
    if shard_weights:
        group.shard_layers(dit, dit.shard_units())
    fill_random(dit, group.device, seed=cfg.runtime.seed)
    dit.eval().requires_grad_(False)
    if hasattr(dit, "apply_runtime"):  # runtime.compile / attention_backend / fuse_qkv, as AvatarModels.load
        dit.apply_runtime(cfg.runtime)
    elif cfg.runtime.compile:
        raise SystemExit("--set runtime.compile true: this model/net/dit.py has no apply_runtime yet")
    return dit


def compile_blocks(dit: AvatarDiT) -> None:
    """torch.compile each transformer block for the fixed clip shape, fusing the float32 norm/modulation/RoPE
    elementwise chains (about 40% of the DiT's GPU time eager). Each block meets a few shapes (window filling
    up, denoise vs commit), so the per-function recompile limit is raised above that count."""
    import torch._dynamo

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for i, block in enumerate(dit.blocks):
        dit.blocks[i] = torch.compile(block, dynamic=False)


def build_vae_on(cfg: AppConfig, device: torch.device, dtype: torch.dtype) -> AvatarVAE:
    with torch.device(device):
        vae = build_vae(cfg.model.vae)
    return AvatarVAE(vae.to(device=device, dtype=dtype)).apply_runtime(cfg.runtime)


# ----------------------------------------------------------------------------- one stream


@dataclass
class ClipTiming:
    index: int
    submit_s: float  # host time the clip's audio window was handed to the model
    first_out_s: float = 0.0  # host time its first block's frames were on the host
    out_s: float = 0.0  # host time its last frames were on the host
    dit_s: float = 0.0  # GPU time of the DiT (events)
    vae_s: float = 0.0  # GPU time of the decode (events, on the decoding device)
    peak_alloc_gb: list[float] = field(default_factory=list)
    peak_reserved_gb: list[float] = field(default_factory=list)


class StreamDenoiser:
    """The DiT side of one session: the same calls per clip as `StreamingAvatar`, on random conditioning."""

    def __init__(self, dit: AvatarDiT, cfg: AppConfig, device: torch.device, dtype: torch.dtype, steps: int,
                 kv_update: str | None = None):
        self.dit, self.cfg, self.device, self.dtype = dit, cfg, device, dtype
        d = cfg.model.dit
        self.block_frames = d.num_frames_per_block
        self.latent_frames = cfg.video.infer_frames // TIME_STRIDE
        self.latent_hw = (cfg.video.height // SPACE_STRIDE, cfg.video.width // SPACE_STRIDE)
        self.schedule = FlowMatchSchedule(steps, cfg.sampler.shift, cfg.sampler.num_train_timesteps)
        self.kv = KVUpdate(kv_update or cfg.sampler.kv_update, steps)
        self.ref_latent, self.text = session_conditioning(cfg, device, dtype)
        self.rings = [dit.new_cache(1, device, dtype) for _ in range(self.kv.rings)]
        self.frame_start = 0
        initial = self.ref_latent.expand(-1, -1, MOTION_LATENT_FRAMES, -1, -1).clone()
        self.motion = MotionHistory(initial, self.kv.motion_lag_blocks)
        self.denoiser_calls = 0
        self.commit_passes = 0
        for ring in self.rings:
            dit.prefill(ring, self.ref_latent, self.text, None)

    def blocks(self, index: int):
        """Clip `index` block by block (latents [1, 16, F, h, w]); identical noise on every rank."""
        audio, noises = clip_conditioning(self.cfg, index, self.device, self.dtype)
        if index > 0:  # the previous clip's motion, as StreamingAvatar re-prefills after a clip
            motion = self.motion.before(self.frame_start // self.block_frames)
            self.dit.prefill(self.rings[0], self.ref_latent, self.text, motion)
            for ring in self.rings[1:]:
                copy_sink(self.rings[0], ring)
        for b, noise in enumerate(noises):
            block_audio = audio[:, b * self.block_frames * TIME_STRIDE:(b + 1) * self.block_frames * TIME_STRIDE]
            block = generate_block(self.dit, self.rings, noise, block_audio, self.frame_start, self.schedule, self.kv)
            self.denoiser_calls += block.denoiser_calls
            self.commit_passes += int(self.kv.clean_pass)
            self.motion.add(self.frame_start // self.block_frames, block.latents)
            self.frame_start += self.block_frames
            yield block.latents

    def clip(self, index: int) -> torch.Tensor:
        """Latents [1, 16, L, h, w] of clip `index`."""
        return torch.cat(list(self.blocks(index)), dim=2)


def session_conditioning(cfg: AppConfig, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Random reference latent and text context of the real shapes (same on every rank)."""
    d = cfg.model.dit
    latent_hw = (cfg.video.height // SPACE_STRIDE, cfg.video.width // SPACE_STRIDE)
    gen = torch.Generator(device=device).manual_seed(cfg.runtime.seed + 1)
    ref_latent = torch.randn(1, d.in_channels, 1, *latent_hw, generator=gen, device=device).to(dtype)
    text = torch.randn(1, d.text_len, d.text_dim, generator=gen, device=device).to(dtype)
    return ref_latent, text


def clip_conditioning(cfg: AppConfig, index: int, device: torch.device,
                      dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Clip `index`'s random audio features [1, 4L, layers, dim] and its blocks' noise."""
    d = cfg.model.dit
    latent_frames = cfg.video.infer_frames // TIME_STRIDE
    latent_hw = (cfg.video.height // SPACE_STRIDE, cfg.video.width // SPACE_STRIDE)
    gen = torch.Generator(device=device).manual_seed(cfg.runtime.seed * 1000 + index)
    audio = torch.randn(1, TIME_STRIDE * latent_frames, d.num_audio_layers, d.audio_dim, generator=gen,
                        device=device).to(dtype)
    noises = [torch.randn(1, d.in_channels, d.num_frames_per_block, *latent_hw, generator=gen, device=device).to(dtype)
              for _ in range(latent_frames // d.num_frames_per_block)]
    return audio, noises


def to_uint8_frames(video: torch.Tensor) -> torch.Tensor:
    """[1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3] on the same device."""
    return ((video[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


# ----------------------------------------------------------------------------- the measured loops


class Clock:
    """GPU-event timing without host syncs; event times map to host time through one anchor event."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(device)
            self.anchor = self.mark()
            self.anchor.synchronize()
            self.anchor_host_s = time.perf_counter()  # the GPU was idle: the anchor ran at about this time

    def mark(self, stream=None):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def host_time(self, mark) -> float:
        """Host clock reading of the moment the GPU reached `mark`."""
        if not self.cuda:
            return mark
        mark.synchronize()
        return self.anchor_host_s + self.anchor.elapsed_time(mark) / 1000.0


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def read_peak(device: torch.device) -> tuple[float, float]:
    if device.type != "cuda":
        return 0.0, 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30


def run_dit_rank(args, cfg: AppConfig, group: parallel.ParallelGroup, dtype: torch.dtype) -> list[dict]:
    """Rank 0 and the other DiT ranks: build once, then one measured session per (kv_update, decode mode)."""
    device = group.device
    t0 = time.perf_counter()
    dit = build_dit(cfg, group, dtype, args.shard_weights)
    if args.compile:
        compile_blocks(dit)
    build_s = time.perf_counter() - t0
    modes = args.vae_modes
    vae = build_vae_on(cfg, device, dtype) if group.rank == 0 and "rank" not in modes else None
    rows = []
    with torch.inference_mode():
        for kv_update in args.kv_updates:
            # Warm-up session (kernel selection, allocator, compiled shapes), then the FLOPs of one clip.
            warm = StreamDenoiser(dit, cfg, device, dtype, args.sample_steps, kv_update)
            warm_start = time.perf_counter()
            for i in range(args.warmup_clips):
                warm.clip(i)
            warmup_s = time.perf_counter() - warm_start
            # FLOPs of a clip with the KV window full (a stream's first clip attends to fewer keys)
            flops = count_flops(lambda w=warm: w.clip(args.warmup_clips), dit)
            if args.profile:  # every rank runs the clip (its collectives pair up); rank 0 records and prints
                print_profile(lambda w=warm: w.clip(args.warmup_clips + 1), device, record=group.rank == 0)
            warm = None  # its cache goes before the measured sessions
            for mode in modes:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                session = StreamDenoiser(dit, cfg, device, dtype, args.sample_steps, kv_update)
                timings = measure_session(args, cfg, group, vae, mode, dtype, session.ref_latent,
                                          _local_blocks(session, args.clips))
                calls = session.denoiser_calls + session.commit_passes
                rows.append(summarise(args, cfg, group, mode, kv_update, timings, flops, build_s, warmup_s, calls))
    return rows


def _local_blocks(session: StreamDenoiser, clips: int):
    """(clip, block, latents, submit host time) for clips back to back on this process (or Ulysses group)."""
    for n in range(clips):
        submit_s = time.perf_counter()
        for b, latents in enumerate(session.blocks(n)):
            yield n, b, latents, submit_s


# ----------------------------------------------------------------------------- tpp: one GPU per step


def run_tpp(args, cfg: AppConfig, group: parallel.ParallelGroup, dtype: torch.dtype) -> list[dict]:
    """parallel.mode tpp: every rank builds the whole DiT; rank 0 drives `TppDriver`, the others follow it."""
    from types import SimpleNamespace

    from model.parallel import tpp

    device = group.device
    t0 = time.perf_counter()
    dit = build_dit(cfg, group, dtype, shard_weights=False)
    build_s = time.perf_counter() - t0
    with torch.inference_mode():
        flops = tpp_clip_flops(dit, cfg, device, dtype)
    if group.rank != 0:
        reset_peak(device)
        blocks = tpp.follow(SimpleNamespace(dit=dit), cfg, group)
        alloc, reserved = read_peak(device)
        return [{"rank": group.rank, "blocks": blocks, "peak_alloc_gb": [alloc, alloc],
                 "peak_reserved_gb": [reserved, reserved]}]
    vae = build_vae_on(cfg, device, dtype)
    driver = tpp.TppDriver(dit, cfg, group)
    rows = []
    try:
        with torch.inference_mode():
            warm_start = time.perf_counter()
            for _ in _tpp_blocks(driver, cfg, device, dtype, 1 + args.warmup_clips, session_id=0):
                pass
            warmup_s = time.perf_counter() - warm_start
            for i, mode in enumerate(args.vae_modes):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    torch.cuda.empty_cache()
                ref_latent, _ = session_conditioning(cfg, device, dtype)
                timings = measure_session(args, cfg, group, vae, mode, dtype, ref_latent,
                                          _tpp_blocks(driver, cfg, device, dtype, args.clips, session_id=1 + i))
                calls = args.clips * (cfg.video.infer_frames // TIME_STRIDE // cfg.model.dit.num_frames_per_block) \
                    * args.sample_steps
                rows.append(summarise(args, cfg, group, mode, "per_step", timings, flops, build_s, warmup_s, calls))
    finally:
        driver.quit()
    return rows


def _tpp_blocks(driver, cfg: AppConfig, device: torch.device, dtype: torch.dtype, clips: int, session_id: int):
    """(clip, block, clean latents, submit host time) through the step pipeline, kept full: clip n+1's window
    is handed over as soon as clip n's first block is out (in time for its first block to enter next)."""
    from model.parallel import tpp

    frames = cfg.model.dit.num_frames_per_block
    ref_latent, text = session_conditioning(cfg, device, dtype)
    initial = ref_latent.expand(-1, -1, MOTION_LATENT_FRAMES, -1, -1).clone()
    driver.open(session_id, ref_latent, text, MotionHistory(initial, driver.steps - 1))
    tickets: dict[int, list] = {}
    submitted: dict[int, float] = {}
    next_block = 0

    def submit(n: int) -> None:
        nonlocal next_block
        submitted[n] = time.perf_counter()
        audio, noises = clip_conditioning(cfg, n, device, dtype)
        tickets[n] = []
        for b, noise in enumerate(noises):
            ticket = tpp.Ticket(session_id, next_block, next_block * frames, new_sink=b == 0 and n > 0)
            block_audio = audio[:, b * frames * TIME_STRIDE:(b + 1) * frames * TIME_STRIDE]
            tickets[n].append(driver.submit(ticket, noise, block_audio))
            next_block += 1

    submit(0)
    for n in range(clips):
        for b, ticket in enumerate(tickets.pop(n)):
            latents = driver.wait(ticket)
            if b == 0 and n + 1 < clips:
                submit(n + 1)
            yield n, b, latents, submitted[n]
    driver.close(session_id)


def tpp_clip_flops(dit: AvatarDiT, cfg: AppConfig, device: torch.device, dtype: torch.dtype) -> float:
    """Useful FLOPs of one steady clip under tpp: blocks x steps DiT calls on a full window + one sink prefill
    (what one process in kv_update per_step computes; the other ranks' copies of the prefill are not counted).
    Counted on every rank at once, before the pipeline starts."""
    d = cfg.model.dit
    steps = cfg.sampler.sample_steps
    blocks = cfg.video.infer_frames // TIME_STRIDE // d.num_frames_per_block
    ref_latent, text = session_conditioning(cfg, device, dtype)
    audio, noises = clip_conditioning(cfg, 0, device, dtype)
    block_audio = audio[:, :d.num_frames_per_block * TIME_STRIDE]
    cache = dit.new_cache(1, device, dtype)
    dit.prefill(cache, ref_latent, text)
    t = torch.full((1,), 500.0, device=device)
    for i in range(cache.num_slots):  # fill the window
        dit(noises[0], t, block_audio, cache, i * d.num_frames_per_block, store_slot=True)
    frame = cache.num_slots * d.num_frames_per_block
    call = count_flops(lambda: dit(noises[0], t, block_audio, cache, frame), dit)
    prefill = count_flops(lambda: dit.prefill(cache, ref_latent, text), dit)
    cache.clear()
    return blocks * steps * call + prefill


# ----------------------------------------------------------------------------- measuring a session


def measure_session(args, cfg: AppConfig, group: parallel.ParallelGroup, vae: AvatarVAE | None, mode: str,
                    dtype: torch.dtype, ref_latent: torch.Tensor, blocks) -> list[ClipTiming]:
    """One session of `args.clips` clips; each block's frames reach rank 0's host as `clip_parts` gives them.

    `blocks` yields (clip, block, latents, submit host time) in stream order; the DiT's GPU time of a
    clip is the sum of the spans in which its blocks were produced (for tpp: rank 0's wait for them).
    """
    device = group.device
    side_stream = torch.cuda.Stream(device) if device.type == "cuda" else None  # decode or frame receive
    vae_rank = group.layout.vae_rank
    decoder = vae.new_decoder(ref_latent) if vae is not None else None
    if group.rank == 0 and mode == "rank":
        group.send_to_rank(ref_latent, vae_rank)
    clock = Clock(device)
    block_latent_frames = cfg.model.dit.num_frames_per_block
    block_shape = (TIME_STRIDE * block_latent_frames, cfg.video.height, cfg.video.width, 3)
    pinned = [torch.empty(block_shape, dtype=torch.uint8, pin_memory=device.type == "cuda") for _ in range(8)]
    timings: dict[int, ClipTiming] = {}
    pending: collections.deque = collections.deque()  # blocks whose frames are still on their way
    peak_clips = {min(10, args.clips - 1), args.clips - 1}
    blocks_per_clip = cfg.video.infer_frames // TIME_STRIDE // block_latent_frames
    in_flight = blocks_per_clip if mode != "inline" else 0  # decode queue behind the DiT: about one clip

    def decode_on_stream(latents: torch.Tensor, ready, host: torch.Tensor):
        torch.cuda.set_device(device)  # a new thread starts on GPU 0
        with torch.inference_mode(), torch.cuda.stream(side_stream):
            side_stream.wait_event(ready)
            vae_start = clock.mark(side_stream)
            frames = to_uint8_frames(decoder.decode(latents))
            vae_end = clock.mark(side_stream)
            host.copy_(frames, non_blocking=True)
            return clock.mark(side_stream), vae_start, vae_end

    decode_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")

    def finish(item) -> None:
        timing, block, done, vae_start, vae_end, dit_start, dit_end = item
        if isinstance(done, concurrent.futures.Future):
            done, vae_start, vae_end = done.result()
        out_s = clock.host_time(done)
        if block == 0:
            timing.first_out_s = out_s
        timing.out_s = out_s
        timing.dit_s += clock.seconds(dit_start, dit_end)
        if vae_start is not None:
            timing.vae_s += clock.seconds(vae_start, vae_end)
        if block == blocks_per_clip - 1 and timing.index in peak_clips:
            alloc, reserved = read_peak(device)
            timing.peak_alloc_gb, timing.peak_reserved_gb = [alloc], [reserved]

    dit_start = clock.mark()
    for count, (n, b, latents, submit_s) in enumerate(blocks):
        dit_end = clock.mark()
        if b == 0:
            timings[n] = ClipTiming(n, submit_s=submit_s)
        timing = timings[n]
        host = pinned[count % len(pinned)]
        if group.rank != 0:
            pending.append((timing, b, dit_end, None, None, dit_start, dit_end))
        elif mode == "rank":
            group.send_to_rank(latents, vae_rank)
            # receive on a side stream, or the next block's DiT would queue behind the decode
            if side_stream is not None:
                side_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side_stream) if side_stream is not None else contextlib.nullcontext():
                frames = group.recv_from_rank(block_shape, torch.uint8, vae_rank)
                host.copy_(frames, non_blocking=True)
                done = clock.mark(side_stream)
            pending.append((timing, b, done, None, None, dit_start, dit_end))
        elif mode == "stream" and side_stream is not None:
            # A decode thread on a second stream: the decoder syncs with the host now and then, and from
            # this thread that would hold back the launches of the next block's DiT.
            latents.record_stream(side_stream)
            pending.append((timing, b, decode_thread.submit(decode_on_stream, latents, dit_end, host), None, None,
                            dit_start, dit_end))
        else:
            vae_start = clock.mark()
            frames = to_uint8_frames(decoder.decode(latents))
            vae_end = clock.mark()
            host.copy_(frames, non_blocking=device.type == "cuda")
            done = clock.mark()
            pending.append((timing, b, done, vae_start, vae_end, dit_start, dit_end))
        while len(pending) > in_flight:
            finish(pending.popleft())
        if b == blocks_per_clip - 1 and n + 1 in peak_clips:
            reset_peak(device)
        dit_start = clock.mark()
    while pending:
        finish(pending.popleft())
    decode_thread.shutdown()
    if decoder is not None:
        decoder.close()
    return [timings[n] for n in sorted(timings)]


def print_profile(fn, device: torch.device, rows: int = 18, record: bool = True) -> None:
    """Where one clip's GPU time goes, by operator; `record=False` only runs `fn` (the other ranks of a group)."""
    from torch.profiler import ProfilerActivity, profile

    if not record:
        fn()
        return
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("PROFILE one clip, top operators by device time", flush=True)
    print(prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
    # The same time split by input shapes: tells which tensors the elementwise time is spent on.
    print("PROFILE by input shape", flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40,
                                                             max_shapes_column_width=70), flush=True)


def run_vae_rank(args, cfg: AppConfig, group: parallel.ParallelGroup, dtype: torch.dtype) -> dict:
    """The decode-only rank: receive a clip's latents from rank 0, decode, send its frames back."""
    device = group.device
    vae = build_vae_on(cfg, device, dtype)
    d = cfg.model.dit
    latent_hw = (cfg.video.height // SPACE_STRIDE, cfg.video.width // SPACE_STRIDE)
    blocks = cfg.video.infer_frames // TIME_STRIDE // d.num_frames_per_block
    clock = Clock(device)
    vae_s = []
    peaks = []
    with torch.inference_mode():
        for _ in range(len(args.kv_updates)):  # one session per measured variant
            ref = group.recv_from_rank((1, d.in_channels, 1, *latent_hw), dtype, src=0)
            decoder = vae.new_decoder(ref)
            for n in range(args.clips):
                if n == args.clips - 1:
                    reset_peak(device)
                clip_s = 0.0
                for _ in range(blocks):
                    latents = group.recv_from_rank((1, d.in_channels, d.num_frames_per_block, *latent_hw), dtype,
                                                   src=0)
                    start = clock.mark()
                    frames = to_uint8_frames(decoder.decode(latents))
                    end = clock.mark()
                    group.send_to_rank(frames, dst=0)
                    clip_s += clock.seconds(start, end)
                vae_s.append(clip_s)
            peaks.append(read_peak(device))
            decoder.close()
    return {"vae_rank_s_per_clip": statistics.median(vae_s[1:] or vae_s), "vae_rank_peak_gb": peaks[-1][0]}


def count_flops(fn, dit: AvatarDiT) -> float:
    """Floating-point operations of one call of `fn` (matmuls, convolutions, attention) on this rank.

    The count runs the blocks eager: torch.compile cannot trace under the counter's dispatch mode, and a
    frame it fails on stays eager for good, which would leave every later (timed) call uncompiled.
    """
    from torch.utils.flop_counter import FlopCounterMode

    compiled = [getattr(block, "compiled_compute", None) for block in dit.blocks]
    for block in dit.blocks:
        block.compiled_compute = None
    counter = FlopCounterMode(display=False)
    try:
        with counter:
            fn()
    finally:
        for block, compute in zip(dit.blocks, compiled):
            block.compiled_compute = compute
    return float(counter.get_total_flops())


def summarise(args, cfg: AppConfig, group: parallel.ParallelGroup, mode: str, kv_update: str,
              timings: list[ClipTiming], flops: float, build_s: float, warmup_s: float, dit_calls: int) -> dict:
    steady = timings[1:] if len(timings) > 1 else timings
    frames_per_clip = cfg.video.infer_frames
    span_s = timings[-1].out_s - timings[0].out_s
    fps = frames_per_clip * (len(timings) - 1) / span_s if len(timings) > 1 and span_s > 0 else float("nan")
    dit_s = statistics.median(t.dit_s for t in steady)
    vae_s = statistics.median(t.vae_s for t in steady)
    tpp = cfg.parallel.mode == "tpp"
    # Under tpp rank 0 only waits for the pipeline; the GPUs' time per clip is the clip period.
    period_s = span_s / (len(timings) - 1) if len(timings) > 1 and span_s > 0 else dit_s
    mfu_s = period_s if tpp else dit_s
    gpus_for_mfu = group.pp_size if tpp else 1  # Ulysses: each rank counts its own FLOPs (merged as a mean)
    peak_10 = next((t for t in timings if t.peak_alloc_gb and t.index != timings[-1].index), timings[-1])
    return {
        "rank": group.rank,
        "gpus": group.world_size,
        "sp": group.sp_size,
        "parallel": cfg.parallel.mode if group.world_size > 1 else "-",
        "kv_update": kv_update,
        "fp8": getattr(cfg.runtime, "fp8", "none"),
        "mode": mode + ("+fsdp" if args.shard_weights else "")
        + (f"+fp8-{cfg.runtime.fp8}" if getattr(cfg.runtime, "fp8", "none") != "none" else "")
        + ("+compile" if args.compile or cfg.runtime.compile else "")
        + (f"+{args.sdpa}" if args.sdpa != "default" else "")
        + (f"+cap{args.mem_cap_gb:g}GB" if args.mem_cap_gb else ""),
        "size": cfg.video.size,
        "frames": frames_per_clip,
        "steps": args.sample_steps,
        "layers": cfg.model.dit.num_layers,
        "clips": len(timings),
        "dit_s": dit_s,
        "vae_s": vae_s,
        "fps": fps,
        "ttff_s": timings[0].first_out_s - timings[0].submit_s,
        "clip0_s": timings[0].out_s - timings[0].submit_s,
        "first_part_s": statistics.median(t.first_out_s - t.submit_s for t in steady),
        "latency_s": statistics.median(t.out_s - t.submit_s for t in steady),
        "flops_per_clip_rank": flops,
        "mfu": flops / mfu_s / gpus_for_mfu / (H200_BF16_DENSE_TFLOPS * 1e12) if mfu_s > 0 else float("nan"),
        "peak_gb_clip": [peak_10.index, timings[-1].index],
        "peak_alloc_gb": [peak_10.peak_alloc_gb[0] if peak_10.peak_alloc_gb else 0.0,
                          timings[-1].peak_alloc_gb[0] if timings[-1].peak_alloc_gb else 0.0],
        "peak_reserved_gb": [peak_10.peak_reserved_gb[0] if peak_10.peak_reserved_gb else 0.0,
                             timings[-1].peak_reserved_gb[0] if timings[-1].peak_reserved_gb else 0.0],
        "dit_calls_per_clip": dit_calls / max(len(timings), 1),
        "build_s": build_s,
        "warmup_s": warmup_s,
        "label": args.label,
    }


# ----------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/liveavatar_14b.yaml")
    p.add_argument("--clips", type=int, default=12, help="measured clips (the first gives TTFF)")
    p.add_argument("--warmup_clips", type=int, default=1, help="clips before the FLOP count and the measurement")
    p.add_argument("--sample_steps", type=int, default=None)
    p.add_argument("--kv_update", default=None,
                   help="comma list of sampler.kv_update modes, one measured session each (default: the config's)")
    p.add_argument("--vae_mode", default="stream",
                   help="comma list, one measured session each. inline: decode after the DiT on one stream; "
                        "stream: decode clip n on a second CUDA stream while the DiT runs clip n+1; "
                        "rank: a separate VAE GPU (the last rank; alone, not in a list)")
    p.add_argument("--profile", action="store_true", help="print rank 0's per-operator GPU time for one clip")
    p.add_argument("--sdpa", choices=("default", "flash", "cudnn", "efficient"), default="default",
                   help="force one scaled-dot-product-attention backend")
    p.add_argument("--shard_weights", action="store_true", help="per-layer weight sharding over the DiT ranks")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each DiT block; today it recompiles for every new session (the K/V writers "
                        "close over the session's cache), so only long sessions show its speed")
    p.add_argument("--mem_cap_gb", type=float, default=None, help="per-process GPU memory cap")
    p.add_argument("--label", default="")
    p.add_argument("--json_out", default=None)
    p.add_argument("--set", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="config override, e.g. --set video.size 256*256 --set model.dit.num_layers 8")
    p.add_argument("--device", default=None, help="override runtime.device (cpu for a dry run)")
    return p.parse_args(argv)


def bench_config(path: str, overrides: dict) -> AppConfig:
    """Load a preset with overrides; a shorter layer stack keeps the audio injectors that still fit."""
    overrides = dict(overrides)
    layers = overrides.get("model.dit.num_layers")
    if layers is not None and "model.dit.audio_inject_layers" not in overrides:
        inject = [i for i in load_config(path).model.dit.audio_inject_layers if i < int(layers)]
        overrides["model.dit.audio_inject_layers"] = inject
    return load_config(path, overrides)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = dict(args.set)
    if args.device:
        overrides["runtime.device"] = args.device
        if args.device == "cpu":
            overrides.setdefault("runtime.dtype", "float32")
    cfg = bench_config(args.config, overrides)
    if args.sample_steps and args.sample_steps != cfg.sampler.sample_steps:
        cfg = replace_key(cfg, "sampler.sample_steps", args.sample_steps)
    args.sample_steps = cfg.sampler.sample_steps
    args.kv_updates = [m for m in (args.kv_update or cfg.sampler.kv_update).split(",") if m]
    for m in args.kv_updates:
        KVUpdate(m, args.sample_steps)  # names the flag if unknown
    if cfg.parallel.mode == "tpp" and args.kv_updates != ["per_step"]:
        raise SystemExit("--set parallel.mode tpp runs kv_update per_step only; drop --kv_update")
    args.vae_modes = [m for m in args.vae_mode.split(",") if m]
    bad = [m for m in args.vae_modes if m not in VAE_MODES]
    if bad or ("rank" in args.vae_modes and len(args.vae_modes) > 1):
        raise SystemExit(f"--vae_mode {args.vae_mode!r}: use a comma list of {VAE_MODES[:2]} or 'rank' alone")
    if cfg.parallel.mode == "tpp" and ("rank" in args.vae_modes or args.shard_weights):
        raise SystemExit("--set parallel.mode tpp: rank 0 decodes and every rank holds the whole DiT; "
                         "no --vae_mode rank, no --shard_weights")
    group = parallel.start_group(cfg.runtime.device, cfg.model.dit.num_heads, vae_rank="rank" in args.vae_modes,
                                 mode=cfg.parallel.mode)
    parallel.check_step_pipeline(cfg, group.pp_size)
    if args.mem_cap_gb and group.device.type == "cuda":
        total = torch.cuda.get_device_properties(group.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.mem_cap_gb * 2**30 / total), group.device)
    dtype = getattr(torch, cfg.runtime.dtype)
    if group.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(group.world_size, 1)))
    try:
        with sdpa_backend(args.sdpa):
            if group.role == parallel.ROLE_VAE:
                rows = [run_vae_rank(args, cfg, group, dtype)]
            elif cfg.parallel.mode == "tpp":
                rows = run_tpp(args, cfg, group, dtype)
            else:
                rows = run_dit_rank(args, cfg, group, dtype)
        sessions = len(args.vae_modes) * (1 if cfg.parallel.mode == "tpp" else len(args.kv_updates))
        for i in range(sessions):
            results = group.gather_objects(rows[min(i, len(rows) - 1)])
            if group.rank == 0:
                line = json.dumps(merge(results))
                print("RESULT " + line, flush=True)
                if args.json_out:
                    with open(args.json_out, "a") as fh:
                        fh.write(line + "\n")
    finally:
        group.shutdown()
    return 0


def sdpa_backend(name: str):
    """A context forcing one SDPA backend ('default' leaves PyTorch's choice)."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


def merge(results: list[dict]) -> dict:
    """Rank 0's row, with every rank's peak memory and the VAE rank's decode time."""
    row = dict(results[0])
    row["peak_alloc_gb_per_rank"] = [r.get("peak_alloc_gb", [r.get("vae_rank_peak_gb", 0.0)] * 2) for r in results]
    row["peak_reserved_gb_per_rank"] = [r.get("peak_reserved_gb", [0.0, 0.0]) for r in results]
    vae_rank = [r for r in results if "vae_rank_s_per_clip" in r]
    if vae_rank:
        row["vae_s"] = vae_rank[0]["vae_rank_s_per_clip"]
    if row.get("parallel") != "tpp":  # tpp: rank 0's figure already spans the whole pipeline
        row["mfu"] = statistics.mean(r["mfu"] for r in results if "mfu" in r)
        row["flops_per_clip"] = sum(r.get("flops_per_clip_rank", 0.0) for r in results)
    return row


if __name__ == "__main__":
    sys.exit(main())
