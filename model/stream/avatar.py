"""The streaming avatar: one reference image and prompt, then one video clip per audio window, forever.

`AvatarModels` holds the weights (loaded once per process); `StreamingAvatar` is one session: its
noise generator, the DiT's KV cache, the motion context and the VAE's causal cache. A clip is
audio features -> for each block: noise, a few sampler steps, K/V into the cache -> online decode.
`next_clip` = `decode_clip(denoise_clip(window))`; the two halves are public so a caller may run the
decode of clip n alongside the denoising of clip n+1.

How clips follow each other is the streaming scheme (`stream.*`, `model/stream/scheme.py`): `reference`
(LiveAvatar's path: one KV window per sampling step, static motion latents from the image's still video,
the sink swapped to the first generated frame after clip 0, a sink distance drawn per DiT call) or `ours`.
How a block's K/V reach the cache is `sampler.kv_update` (see `model.stream.sampler.KVUpdate`): one window
per step (the reference), an extra clean pass, or the last step's call. `generate_block` and
`MotionHistory` are the pieces that `model/parallel/tpp.py` (one GPU per step) and `bench/` share with this
class, so all of them make the same DiT calls.
"""
from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import UMT5EncoderModel, Wav2Vec2Model

from model.config import AppConfig
from model.encoders.audio import AudioEncoder, wav2vec2_config
from model.encoders.text import TextEncoder, make_tokenizer, umt5_config
from model.io_types import AudioWindow, VideoClip
from model.net.dit import AvatarDiT, StreamCache
from model.net.motion import MOTION_LATENT_FRAMES
from model.parallel import group as parallel
from model.stream.detail import DetailRestore
from model.stream.sampler import MAX_SAMPLE_STEPS, FlowMatchSchedule, KVUpdate, denoise_steps
from model.stream.scheme import SinkDistances, clip_noise, motion_start
from model.stream.sizing import fit_reference_image, rgb_image, session_frame_size
from model.vae.streaming import TIME_STRIDE, AvatarVAE, StreamingDecoder, build_vae
from model.weights.hub import resolve_checkpoint
from model.weights.names import CheckpointError

LOG = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- weights


@dataclass
class AvatarModels:
    """Every network the avatar needs, on one device in one dtype; shared read-only by all sessions."""

    dit: AvatarDiT
    vae: AvatarVAE
    audio_encoder: AudioEncoder
    text_encoder: TextEncoder
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, cfg: AppConfig) -> AvatarModels:
        """Random weights under runtime.seed (checkpoint null), the tiny bundle (.safetensors) or a published folder."""
        device, dtype = torch.device(cfg.runtime.device), _DTYPES[cfg.runtime.dtype]
        if cfg.runtime.num_threads > 0:
            torch.set_num_threads(cfg.runtime.num_threads)
        checkpoint = _resolve_checkpoint(cfg.model.checkpoint)
        checkpoint_dir = checkpoint if checkpoint is not None and checkpoint.is_dir() else None
        group = parallel.current()
        if cfg.parallel.shard_weights and group.sp_size > 1:
            modules = _sharded_modules(cfg, group, checkpoint, device, dtype)
        elif checkpoint is None:
            modules = _random_modules(cfg, device, dtype)
        else:
            # Built on `meta` and filled tensor by tensor: no part of the model is ever in memory twice.
            with torch.device("meta"):
                modules = {name: build() for name, build in _builders(cfg).items()}
            _load_checkpoint(cfg, checkpoint, modules, device, dtype)
        text_device = module_device(cfg, "text_encoder")
        if checkpoint is not None and text_device != device:
            modules["text_encoder"].to(text_device)
        modules["dit"].eval().requires_grad_(False)
        # Speed options (same results within float tolerance): attention backend, fused QKV, compile, VAE decode.
        modules["dit"].apply_runtime(cfg.runtime)
        return cls(
            dit=modules["dit"],
            vae=AvatarVAE(modules["vae"]).apply_runtime(cfg.runtime).apply_stream(cfg.model.vae),
            audio_encoder=AudioEncoder(modules["audio_encoder"], cfg.audio_sample_rate_hz),
            text_encoder=TextEncoder(modules["text_encoder"], make_tokenizer(cfg.model.text_encoder, checkpoint_dir),
                                     cfg.model.text_encoder.text_len),
            device=device,
            dtype=dtype,
        )


def _resolve_checkpoint(checkpoint: str | None) -> Path | None:
    """The checkpoint path as given, inside the repository (presets name files relative to it), or a hub id
    in the local Hugging Face cache (`model/weights/hub.py`); WeightsNotFound says what to download."""
    return None if checkpoint is None else resolve_checkpoint(checkpoint)


def _builders(cfg: AppConfig) -> dict[str, Callable[[], torch.nn.Module]]:
    """How to build each network at the configured size (random weights), DiT first (the largest)."""
    return {
        "dit": lambda: AvatarDiT(cfg.model.dit),
        "vae": lambda: build_vae(cfg.model.vae),
        "audio_encoder": lambda: Wav2Vec2Model(wav2vec2_config(cfg.model.audio_encoder)),
        "text_encoder": lambda: UMT5EncoderModel(umt5_config(cfg.model.text_encoder)),
    }


def module_device(cfg: AppConfig, name: str) -> torch.device:
    """Where network `name` runs: the runtime device, except a text encoder sent to the CPU
    (`runtime.text_encoder_device cpu`: umT5-XXL is 11 GB in bf16 and runs once per session)."""
    if name == "text_encoder" and cfg.runtime.text_encoder_device != "auto":
        return torch.device(cfg.runtime.text_encoder_device)
    return torch.device(cfg.runtime.device)


def _random_modules(cfg: AppConfig, device: torch.device, dtype: torch.dtype,
                    skip: tuple[str, ...] = ()) -> dict[str, torch.nn.Module]:
    """Random weights under runtime.seed, initialised on the device and cast one network at a time,
    so at most one network is ever held in float32 (the 14B DiT alone is 56 GB in float32)."""
    torch.manual_seed(cfg.runtime.seed)
    modules = {}
    for name, build in _builders(cfg).items():
        if name in skip:
            continue
        with torch.device(device if name == "dit" else module_device(cfg, name)):
            module = build()
        if name == "dit":
            module.cast(dtype)
        elif dtype != torch.float32:
            module.to(dtype)
        modules[name] = module
    return modules


def _sharded_modules(cfg: AppConfig, group: parallel.ParallelGroup, checkpoint: Path | None,
                     device: torch.device, dtype: torch.dtype) -> dict[str, torch.nn.Module]:
    """The DiT with its block and audio-injector weights sharded over the DiT ranks (`parallel.shard_weights`).

    Built on `meta`, cast, swapped to float8 layers if `runtime.fp8` asks, sharded, then filled one
    tensor at a time (each rank keeps its rows): no GPU ever holds the whole DiT. The other networks
    load whole, as without sharding.
    """
    with torch.device("meta"):
        modules = {name: build() for name, build in _builders(cfg).items()}
    dit = modules["dit"].cast(dtype)
    dit.quantize_fp8(cfg.runtime.fp8)
    group.shard_layers(dit, dit.shard_units())
    if checkpoint is None:
        from model.weights.checkpoint import fill_random

        fill_random(dit, device, seed=cfg.runtime.seed)
        modules.update(_random_modules(cfg, device, dtype, skip=("dit",)))
    else:
        dit.to_empty(device=device)
        _load_checkpoint(cfg, checkpoint, modules, device, dtype)
    return modules


def _load_checkpoint(cfg: AppConfig, path: Path, modules: dict[str, torch.nn.Module], device: torch.device,
                     dtype: torch.dtype) -> None:
    """Fill the `meta` modules from disk: one .safetensors bundle, or a published checkpoint folder."""
    from model.weights.checkpoint import bundle_config, load_bundle
    from model.weights.published import load_published

    if path.is_file():
        trained = bundle_config(path)  # the config it was trained with (decoder width, how its decoder was primed)
        try:
            load_bundle(path, modules, device=device, dtype=dtype)
        except CheckpointError as exc:
            width, ours = trained.model.vae.decoder_base_dim, cfg.model.vae.decoder_base_dim
            if width != ours:
                raise CheckpointError(f"{exc}\n  {path} holds a VAE decoder of base width {width or 'base_dim'}, this "
                                      f"config builds {ours or 'base_dim'}: --model.vae.decoder_base_dim "
                                      f"{width if width is not None else 'null'}") from None
            raise
        _warn_off_training(cfg, trained, path)
    else:
        load_published(path, cfg, device=device, dtype=dtype, **modules)


def _warn_off_training(cfg: AppConfig, trained: AppConfig, path: Path) -> None:
    """One log line when a session decodes in a way the bundle's decoder never saw: the tiny decoder learned
    to continue the still video's latents (`stream.decoder_prime`), and primed otherwise it draws a blur."""
    if trained.stream.decoder_prime != cfg.stream.decoder_prime:
        LOG.warning("%s was trained with --stream.decoder_prime %s; this config uses %s, which its decoder never saw "
                    "(expect a blurred picture)", path, trained.stream.decoder_prime, cfg.stream.decoder_prime)


# ----------------------------------------------------------------------------- image helpers


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [1, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1.0


def video_to_frames(video: torch.Tensor) -> np.ndarray:
    """float [1, 3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    frames = ((video[0].float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


# ----------------------------------------------------------------------------- one session


def fixed_steps_message(cfg: AppConfig, asked: object) -> str:
    """Why a live sample_steps change is refused: under tpp each GPU owns one sampling step."""
    steps = cfg.sampler.sample_steps
    return (f"sample_steps is fixed at {steps} (--sampler.sample_steps): --parallel.mode tpp gives each of the "
            f"{steps} GPUs one sampling step, so the step count is the group size; got {asked!r}. "
            "Use parallel.mode ulysses to change steps live.")


def generate_block(dit: AvatarDiT, rings: list[StreamCache], noise: torch.Tensor, block_audio: torch.Tensor,
                   frame_start: int, schedule: FlowMatchSchedule, kv: KVUpdate,
                   sink_distances: tuple[int | None, ...] | None = None):
    """Noise -> `schedule.sample_steps` Euler steps -> clean block, its K/V in the window(s) as `kv` says.

    `sink_distances`: the reference sink's distance for each DiT call in order (the steps, then the clean
    pass), None for the DiT's fixed rule (`SinkDistances`)."""
    distances = sink_distances or (None,) * kv.calls

    def denoiser(x: torch.Tensor, t: torch.Tensor, step: int) -> torch.Tensor:
        return dit(x, t, block_audio, rings[kv.ring(step)], frame_start, store_slot=kv.stores(step),
                   **sink_kwargs(distances[step]))

    block = denoise_steps(denoiser, noise, schedule)
    if kv.clean_pass:
        dit.commit(rings[0], block.latents, block_audio, frame_start, **sink_kwargs(distances[-1]))
    return block


def sink_kwargs(distance: int | None) -> dict:
    """The DiT call's sink argument: none for the DiT's default fixed rule (distance None)."""
    return {} if distance is None else {"sink_distance": distance}


def copy_sink(src: StreamCache, dst: StreamCache) -> None:
    """Give `dst` the sink and text K/V that a `prefill` wrote into `src` (its window is kept).

    Prefill does not read the cache it writes, so this equals running the same prefill on `dst`.
    """
    if not dst.ready:
        raise RuntimeError("copy_sink: the destination window has not been prefilled yet")
    n = src.sink_tokens
    dst.kv_k[:, :, :n].copy_(src.kv_k[:, :, :n])
    dst.kv_v[:, :, :n].copy_(src.kv_v[:, :, :n])
    dst.text_k.copy_(src.text_k)
    dst.text_v.copy_(src.text_v)
    dst.sink_positions, dst.sink_kind, dst.block_positions = src.sink_positions, src.sink_kind, src.block_positions


class MotionHistory:
    """The clean latent frames behind the stream that condition each new clip's sink (FramePack motion).

    Blocks are added by stream index as they come out clean, in any order; `before(b)` gives the newest
    MOTION_LATENT_FRAMES frames of the blocks before `b - lag_blocks` (KVUpdate.motion_lag_blocks).
    """

    def __init__(self, initial: torch.Tensor, lag_blocks: int = 0) -> None:
        self.latents = initial  # [1, 16, MOTION_LATENT_FRAMES, h, w], newest last
        self.lag_blocks = lag_blocks
        self._pending: dict[int, torch.Tensor] = {}
        self._next = 0  # the oldest block not in `latents` yet

    def add(self, block_index: int, clean: torch.Tensor) -> None:
        self._pending[block_index] = clean

    def before(self, block_index: int) -> torch.Tensor:
        """Motion context for a clip whose first block is `block_index`."""
        while self._next < block_index - self.lag_blocks:
            if self._next not in self._pending:
                raise RuntimeError(f"motion context for block {block_index} needs clean block {self._next}, "
                                   "which has not come out of the sampler yet")
            block = self._pending.pop(self._next)
            history = torch.cat([self.latents, block.to(self.latents.dtype)], dim=2)
            self.latents = history[:, :, -MOTION_LATENT_FRAMES:].clone()
            self._next += 1
        return self.latents


@dataclass
class _Session:
    """What `start` sets up and every clip reads and advances."""

    ref_latent: torch.Tensor  # [1, 16, 1, h, w]: the reference image's latent
    text_context: torch.Tensor  # [1, text_len, text_dim]
    rings: list[StreamCache]  # the DiT's KV window(s): one, or one per sampling step (kv_update per_step)
    decoder: StreamingDecoder
    motion: MotionHistory
    generator: torch.Generator  # stream.noise per_block
    sink_distances: SinkDistances
    frame_size: tuple[int, int]  # (height, width) of this session's frames
    sink_latent: torch.Tensor | None = None  # [1, 16, 1, h, w] in the sink now; None: ref_latent
    first_frame: torch.Tensor | None = None  # the stream's first clean latent frame (stream.sink_swap)
    clip_noise: torch.Tensor | None = None  # stream.noise per_clip: the current clip's noise [1, 16, L, h, w]
    next_frame: int = 0  # latent frame index of the next block in the stream
    detail: DetailRestore | None = None  # video.detail_restore

    @property
    def dit_cache(self) -> StreamCache:
        return self.rings[0]

    @property
    def motion_latents(self) -> torch.Tensor:
        return self.motion.latents


class StreamingAvatar:
    """One live session: `start(reference_image, prompt)`, then `next_clip(window)` as often as audio comes."""

    def __init__(self, models: AvatarModels, cfg: AppConfig, seed: int | None = None) -> None:
        self._models = models
        self._cfg = cfg
        self._seed = cfg.runtime.seed if seed is None else seed
        self._session: _Session | None = None
        self.denoiser_calls = 0
        self.frames_per_block = cfg.model.dit.num_frames_per_block
        self.latent_frames_per_clip = cfg.video.infer_frames // TIME_STRIDE
        self.kv_update = cfg.sampler.kv_update
        self.stream = cfg.stream

    # ---- what the server reads

    @property
    def fps(self) -> float:
        return self._cfg.video.fps

    @property
    def frames_per_clip(self) -> int:
        return self._cfg.video.infer_frames

    @property
    def sample_rate_hz(self) -> int:
        return self._cfg.audio_sample_rate_hz

    @property
    def clip_samples(self) -> int:
        return round(self.frames_per_clip / self.fps * self.sample_rate_hz)

    @property
    def context_samples(self) -> int:
        return round(self._cfg.model.audio_encoder.context_s * self.sample_rate_hz)

    @property
    def frame_size(self) -> tuple[int, int]:
        """(height, width) of the running session's frames; before `start`, those of an image shaped like
        `video.size` (with `video.sizing aspect` each session's follows its image: `frame_size_for`)."""
        if self._session is not None:
            return self._session.frame_size
        return self.frame_size_for((self._cfg.video.height, self._cfg.video.width))

    def frame_size_for(self, image_hw: tuple[int, int]) -> tuple[int, int]:
        """(height, width) a session started with an image of `image_hw` runs at (`video.sizing`)."""
        video = self._cfg.video
        return session_frame_size(video.sizing, (video.height, video.width), image_hw)

    # ---- the session

    @torch.inference_mode()
    def start(self, reference_image: np.ndarray, prompt: str) -> None:
        """Encode identity and prompt, fill the DiT's sink and prime the decoder; drops any earlier session."""
        self.close()
        models = self._models
        reference_image = rgb_image(reference_image)
        frame_size = self.frame_size_for(reference_image.shape[:2])
        image = image_to_tensor(fit_reference_image(reference_image, frame_size, self._cfg.video.sizing))
        ref_latent = models.vae.encode_reference(image).to(models.device, models.dtype)
        text_context = models.text_encoder.encode(prompt)
        start = motion_start(self.stream, models.vae, image, ref_latent)
        detail = self._detail_restore(image) if self._cfg.video.detail_restore else None
        kv = self._kv(self._cfg.sampler.sample_steps)
        rings = self._open_rings(ref_latent, text_context, start.motion_latents, kv.rings)
        generator = torch.Generator(models.device).manual_seed(self._seed)
        self._session = _Session(ref_latent, text_context, rings, models.vae.new_decoder(start.decoder_prime),
                                 MotionHistory(start.motion_latents, kv.motion_lag_blocks), generator,
                                 SinkDistances.from_config(self.stream, self._seed), frame_size, detail=detail)

    def _detail_restore(self, image: torch.Tensor) -> DetailRestore:
        """`video.detail_restore` for a session on `image` [1,3,H,W] in [-1, 1]."""
        return DetailRestore.from_config(image.to(self._models.device), self._cfg.video)

    def _open_rings(self, ref_latent: torch.Tensor, text_context: torch.Tensor, motion_latents: torch.Tensor,
                    count: int) -> list[StreamCache]:
        """`count` KV windows, each holding the session's sink (the reference image and its motion)."""
        models = self._models
        rings = [models.dit.new_cache(1, models.device, models.dtype, **self._cache_kwargs()) for _ in range(count)]
        for ring in rings:
            models.dit.prefill(ring, ref_latent, text_context, motion_latents)
        return rings

    def _cache_kwargs(self) -> dict:
        """The DiT's default motion RoPE rule ("follow") is left out of the call."""
        return {} if self.stream.motion_rope == "follow" else {"motion_rope": self.stream.motion_rope}

    @torch.inference_mode()
    def next_clip(self, window: AudioWindow, sample_steps: int | None = None) -> VideoClip:
        """The window's clip: `frames_per_clip` frames stamped with the window's t0 and clip_index."""
        latents = self.denoise_clip(window, sample_steps)
        frames = self.decode_clip(latents)
        return VideoClip(frames=frames, t0=window.t0, fps=self.fps, clip_index=window.clip_index)

    @torch.inference_mode()
    def clip_parts(self, window: AudioWindow, sample_steps: int | None = None) -> Iterator[VideoClip]:
        """The window's clip block by block: each block's frames leave as soon as the block is denoised.

        Same frames as `next_clip` (the decoder's causal cache streams), but the first ones arrive after
        one block instead of the whole clip, which is what a viewer waits for. Consume it to the end.
        """
        offset = 0
        blocks = self._denoise_blocks(window, sample_steps)
        for index, latents in enumerate(blocks):
            frames = self.decode_clip(latents)
            final = index == self.blocks_per_clip - 1
            yield VideoClip(frames=frames, t0=window.t0 + offset / self.fps, fps=self.fps,
                            clip_index=window.clip_index, offset=offset, final=final)
            offset += len(frames)

    @property
    def blocks_per_clip(self) -> int:
        return self.latent_frames_per_clip // self.frames_per_block

    @torch.inference_mode()
    def denoise_clip(self, window: AudioWindow, sample_steps: int | None = None) -> torch.Tensor:
        """Audio features -> each block denoised, its K/V in the window(s) -> the sink renewed if the scheme
        says: clean latents [1,16,L,h,w]."""
        return torch.cat(list(self._denoise_blocks(window, sample_steps)), dim=2)

    def _denoise_blocks(self, window: AudioWindow, sample_steps: int | None) -> Iterator[torch.Tensor]:
        """Each block's clean latents [1,16,F,h,w] in turn; after the last, the sink is renewed if the scheme says."""
        session = self._require_session()
        steps = self._check_steps(sample_steps)
        self._check_window(window)
        if self.kv_update == "per_step" and len(session.rings) != steps:
            self._reopen_windows(session, steps)
        for i, block_audio in enumerate(self._block_audio(window)):
            block = self._generate_block(session, block_audio, steps)
            if i == self.blocks_per_clip - 1:
                self._renew_sink(session)
            yield block

    def _block_audio(self, window: AudioWindow) -> list[torch.Tensor]:
        """The window's audio features, one [1, 4F, layers, dim] slice per block."""
        audio = self._models.audio_encoder.encode_window(window, self.fps, self.frames_per_clip)[None]
        per_block = TIME_STRIDE * self.frames_per_block
        return [audio[:, i * per_block:(i + 1) * per_block] for i in range(self.blocks_per_clip)]

    @torch.inference_mode()
    def decode_clip(self, latents: torch.Tensor) -> np.ndarray:
        """Online decode on the session's causal cache: uint8 frames [4L, H, W, 3], continuing the last clip."""
        session = self._require_session()
        video = session.decoder.decode(latents)
        if session.detail is not None:
            video = session.detail.apply(video)
        return video_to_frames(video)

    def close(self) -> None:
        """Free the session's caches (the weights stay loaded)."""
        if self._session is not None:
            for ring in self._session.rings:
                ring.clear()
            self._session.decoder.close()
            self._session = None

    # ---- steps of a clip

    def _generate_block(self, session: _Session, block_audio: torch.Tensor, steps: int) -> torch.Tensor:
        """Noise -> `steps` Euler steps with the DiT -> clean block, its K/V in the session's window(s)."""
        frame_start = session.next_frame
        kv = self._kv(steps)
        block = generate_block(self._models.dit, session.rings, self._noise(session), block_audio, frame_start,
                               self._schedule(steps), kv, session.sink_distances.draw(kv.calls))
        self.denoiser_calls += block.denoiser_calls
        if self.stream.motion == "generated":  # static motion never reads the history: keep nothing
            session.motion.add(frame_start // self.frames_per_block, block.latents)
        self._note_first_frame(session, frame_start, block.latents)
        session.next_frame += self.frames_per_block
        return block.latents

    @staticmethod
    def _note_first_frame(session: _Session, frame_start: int, latents: torch.Tensor) -> None:
        """Keep the stream's first clean latent frame: `stream.sink_swap` puts it in the sink after clip 0."""
        if frame_start == 0:
            session.first_frame = latents[:, :, :1].clone()

    def _schedule(self, steps: int) -> FlowMatchSchedule:
        return FlowMatchSchedule(steps, self._cfg.sampler.shift, self._cfg.sampler.num_train_timesteps)

    def _kv(self, steps: int) -> KVUpdate:
        return KVUpdate(self.kv_update, steps)

    def _noise(self, session: _Session) -> torch.Tensor:
        """Initial noise of the block at `session.next_frame` (`stream.noise`)."""
        _, channels, _, h, w = session.ref_latent.shape
        models = self._models
        if self.stream.noise == "per_clip":
            clip, offset = divmod(session.next_frame, self.latent_frames_per_clip)
            if offset == 0 or session.clip_noise is None:
                session.clip_noise = clip_noise(self._seed, clip, (channels, self.latent_frames_per_clip, h, w),
                                                models.device, models.dtype)
            return session.clip_noise[:, :, offset:offset + self.frames_per_block]
        shape = (1, channels, self.frames_per_block, h, w)
        noise = torch.randn(shape, generator=session.generator, device=models.device, dtype=torch.float32)
        return noise.to(models.dtype)

    def _renew_sink(self, session: _Session) -> None:
        """At a clip's end: with `stream.motion generated` the newest clean frames (MotionHistory) become the
        motion tokens, and with `stream.sink_swap` the stream's first generated latent frame becomes the
        reference sink, once, after clip 0 (LiveAvatar's TPP path, causal_s2v_pipeline_tpp.py L998-1025,
        L1110-1117). Either re-prefills the sink, copied into every window of the session."""
        refill, swap = self._sink_change(session)
        if not (refill or swap):
            return
        motion = session.motion.before(session.next_frame // self.frames_per_block) if refill \
            else session.motion.latents
        first, *others = session.rings
        self._models.dit.prefill(first, self._sink_latent(session), session.text_context, motion)
        for ring in others:
            copy_sink(first, ring)

    def _sink_change(self, session: _Session) -> tuple[bool, bool]:
        """(refill the motion tokens, swap the sink latent) before the next clip; records a swap."""
        swap = self.stream.sink_swap and session.sink_latent is None and session.first_frame is not None
        if swap:
            session.sink_latent = session.first_frame
        return self.stream.motion == "generated", swap

    @staticmethod
    def _sink_latent(session: _Session) -> torch.Tensor:
        """The latent in the sink now: the reference image's, or the stream's first frame after a swap."""
        return session.ref_latent if session.sink_latent is None else session.sink_latent

    # ---- checks

    def _require_session(self) -> _Session:
        if self._session is None:
            raise RuntimeError("no session: call start(reference_image, prompt) before next_clip()")
        return self._session

    def _check_steps(self, sample_steps: int | None) -> int:
        steps = self._cfg.sampler.sample_steps if sample_steps is None else sample_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= MAX_SAMPLE_STEPS:
            raise ValueError(f"sample_steps must be an integer in 1..{MAX_SAMPLE_STEPS}, got {sample_steps!r}")
        fixed = self._fixed_steps()
        if fixed is not None and steps != fixed:
            raise ValueError(fixed_steps_message(self._cfg, steps))
        return int(steps)

    def _fixed_steps(self) -> int | None:
        """The one step count this avatar can run (tpp: one GPU per step), or None if any is fine. Under
        `per_step` on one process group a change reopens the windows (`_reopen_windows`)."""
        return self._cfg.sampler.sample_steps if self._cfg.parallel.mode == "tpp" else None

    def _reopen_windows(self, session: _Session, steps: int) -> None:
        """A live `sample_steps` change under `per_step`: one window per new step, opened at this clip with the
        sink as it stands (image or swapped latent, and the motion tokens). The earlier blocks' K/V belong to
        the old steps and are dropped, so this clip's first block attends to the sink and itself, as at a
        stream's start; memory follows the step count (each window is one KV cache of the DiT)."""
        for ring in session.rings:
            ring.clear()
        motion = session.motion.before(session.next_frame // self.frames_per_block) \
            if self.stream.motion == "generated" else session.motion.latents
        session.rings = self._open_rings(self._sink_latent(session), session.text_context, motion, steps)

    def _check_window(self, window: AudioWindow) -> None:
        new = len(window.new_samples)  # after the context, before any look-ahead
        if new != self.clip_samples or window.new_from < 0:
            raise ValueError(f"audio window has {new} new samples after new_from={window.new_from}; this model "
                             f"needs exactly {self.clip_samples} ({self.frames_per_clip} frames at {self.fps} fps, "
                             f"{self.sample_rate_hz} Hz): cut windows with model.stream.windowing.ClipWindower")
