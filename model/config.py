"""Typed configuration: one YAML preset in `configs/`, validated once into frozen dataclasses.

Why one loader for everything: every key of every section can be overridden from the command
line (`--sample_steps 2` or `--sampler.sample_steps 2`), and a bad value is rejected with a
message that names the flag, before any model or socket is touched.
"""
from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.yaml"


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


# ----------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class DiTConfig:
    """Sizes of the audio-conditioned DiT (Wan2.2-S2V family); `docs/model.md` cites each number."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    audio_dim: int = 1024
    audio_inject_layers: tuple[int, ...] = (0, 4, 8, 12, 16, 20, 24, 27, 30, 33, 36, 39)
    num_audio_layers: int = 25
    cond_dim: int = 16
    num_frames_per_block: int = 3
    kv_cache_blocks: int = 4


@dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 VAE (diffusers `AutoencoderKLWan`) sizes: 16 latent channels, 4x time, 8x space."""

    base_dim: int = 96
    # The decoder's own width (diffusers `decoder_base_dim`; null = base_dim). A narrower decoder than encoder is
    # the tiny preset's way to decode in real time on 2 cores: the decode is most of a clip's CPU time.
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # Bounded-context streaming decode (model/vae/streaming.py `StreamingDecoder`): with stream_context_frames P > 0, every
    # stream_restart_frames R latent frames the decoder swaps its causal cache for a fresh one primed with the
    # reference and the last P latent frames, so a decoder that drifts through its own cache (the tiny bundle's)
    # cannot drift for long; costs P extra latent frames of decoding per R. 0 = one continuous cache, as the Wan
    # VAE is trained to decode (the 14B model).
    stream_context_frames: int = 0
    stream_restart_frames: int = 9
    stream_crossfade: bool = True  # fade from the old cache's frames to the fresh one's over the P shared frames


@dataclass(frozen=True)
class AudioEncoderConfig:
    """wav2vec2 encoder; `hidden_size` and `num_hidden_layers` mirror wav2vec2-large-xlsr-53."""

    sample_rate_hz: int = 16000
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    context_s: float = 1.0  # live path: audio before each clip that wav2vec2 hears (the clip's left context)
    # Live path: audio AFTER each clip that wav2vec2 hears (bidirectional attention, as the reference's whole-file
    # pass); the clip is still cut where it is. Paid in latency: the server waits for these seconds of speech
    # before it starts the clip, so audio->video latency grows by exactly lookahead_s. 0 = none.
    lookahead_s: float = 0.0
    # Offline (`run_server.py offline`): "whole_file" runs wav2vec2 once over the file, normalised once, as the
    # reference; "window" cuts it like the live path (context_s, lookahead_s). A file longer than
    # whole_file_max_s is encoded in pieces of that length, each hearing 10 s more on both sides (bounded memory).
    offline_features: str = "whole_file"
    whole_file_max_s: float = 300.0


@dataclass(frozen=True)
class TextEncoderConfig:
    """umT5 encoder (transformers `UMT5EncoderModel`); the 14B model uses umT5-XXL."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    text_len: int = 512
    tokenizer: str = "google/umt5-xxl"  # folder (relative to model.checkpoint) or "bytes" (tiny model)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to build and from which weights."""

    preset: str = "tiny"
    checkpoint: str | None = None
    lora: str | None = None
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    audio_encoder: AudioEncoderConfig = field(default_factory=AudioEncoderConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)


@dataclass(frozen=True)
class VideoConfig:
    """Output video: `size` is width*height as in the reference CLI (`704*384`).

    `sizing` aspect: `size` is an area budget and each session's frame size follows its reference image's
    aspect ratio (LiveAvatar's `get_gen_size`: multiples of 64, e.g. 704*384 -> 384x704 landscape, 704x384
    portrait, 512x512 square); crop: every session runs at exactly `size` (the image is cropped to it).
    """

    size: str = "704*384"
    fps: float = 25.0
    infer_frames: int = 48
    sizing: str = "aspect"
    # Show the model's motion on the sharp reference image (model/stream/detail.py): this project's option for
    # small VAEs that cannot draw an unseen face or photograph; off in the 14B preset (the reference's path).
    detail_restore: bool = False
    detail_settle_s: float = 16.0  # the baseline falls to a darker frame over this long (a steady error sinks in)
    detail_rise_s: float = 0.125  # and rises to a brighter one this fast (a closing mouth is the baseline again)
    # Neither show nor follow a frame's frame-wide change (its median): the model's flashes and exposure drift.
    detail_steady_exposure: bool = False

    @property
    def width(self) -> int:
        return int(self.size.split("*")[0])

    @property
    def height(self) -> int:
        return int(self.size.split("*")[1])


@dataclass(frozen=True)
class SamplerConfig:
    """Few-step flow matching; `sample_steps` may change between clips."""

    sample_steps: int = 4
    shift: float = 3.0
    num_train_timesteps: int = 1000
    # How a block's K/V enter the rolling window: per_step (one window per step, each step reads and writes
    # its own noisy K/V, as LiveAvatar; sample_steps is then fixed), clean_pass (an extra DiT pass on the
    # clean block at timestep 0 writes one window), or last_step (the last denoising step's K/V, one window).
    kv_update: str = "per_step"


@dataclass(frozen=True)
class StreamConfig:
    """How a session's clips follow each other (`docs/model.md`, "Streaming scheme").

    `scheme` is a preset of every other key here plus `sampler.kv_update` and `video.sizing`: a key given
    in the file or on the command line wins over it. reference: LiveAvatar's inference path (its TPP
    multi-GPU script); ours: what this project ran before (motion refilled from generated frames).
    """

    scheme: str = "reference"
    # Motion latents (FramePack) behind every clip: static = the session's initial motion latents for the
    # whole stream; generated = refilled after every clip with the newest generated latent frames.
    motion: str = "static"
    # Initial motion latents: still_video = the VAE encoding of the reference image repeated as a 73-frame
    # still video (19 latent frames); copies = 19 copies of the reference image's one-frame latent.
    motion_init: str = "still_video"
    motion_rope: str = "absolute"  # motion tokens' RoPE frames: absolute (sink-pass frames) | follow (the window)
    # After clip 0 the sink (reference latent) becomes the first generated latent frame of clip 0, once.
    sink_swap: bool = True
    # Reference-sink distance d, drawn per DiT call uniformly in [min, max] from a per-session generator
    # seeded by the session seed: the sink sits at latent frame max(30, frame_start + d). 30..30 is fixed.
    sink_distance_min: int = 4
    sink_distance_max: int = 30
    # Initial noise: per_clip = a generator seeded seed + clip index draws the whole clip, blocks are slices;
    # per_block = one generator per session, one float32 draw per block.
    noise: str = "per_clip"
    # Streaming decoder primed with: still_video = the first 7 latents of the still-video encoding;
    # reference = the reference image's latent (its one frame discarded either way).
    decoder_prime: str = "still_video"


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the model runs."""

    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 42
    num_threads: int = 0
    # Speed options (same results within float tolerance), applied by AvatarDiT.apply_runtime / AvatarVAE:
    compile: bool = False  # torch.compile the DiT block once for all layers (warm-up: one compile per shape)
    compile_mode: str = "default"  # torch.compile mode of the DiT block (no CUDA-graph modes: the cache moves)
    attention_backend: str = "auto"  # SDPA kernel preferred for the DiT's attention
    fuse_qkv: bool = False  # self-attention q/k/v as one GEMM (weights concatenated after loading)
    text_encoder_device: str = "auto"  # auto (= runtime.device) or cpu: the prompt encoder off the GPU
    warmup_clips: int = 0  # clips of silence run once at start-up (kernel choice, compiled shapes) before serving
    # DiT linear layers in float8 (model/net/fp8.py): none | weights (memory) | gemm (memory + FP8 GEMMs, per-row
    # weight and per-token activation scales) | tensor (per-tensor scales: LiveAvatar's --fp8) | auto (tensor on
    # GPUs with float8 tensor cores, none elsewhere)
    fp8: str = "none"
    vae_decode_chunk: int = 1  # latent frames per VAE decoder call (more: fewer, larger kernels, more memory)
    vae_channels_last: bool = False  # VAE decoder weights/activations in channels_last_3d on CUDA
    cudnn_benchmark: bool = False  # let cuDNN time its convolution algorithms per shape (first clip slower)
    # DiT KV cache storage: model (the model's dtype) | float8 (e4m3 + a power-of-two scale per token and
    # head, about half the memory; model/net/kv_quant.py)
    kv_cache_dtype: str = "model"


@dataclass(frozen=True)
class ParallelConfig:
    """GPU group layout (see `model/parallel/group.py`)."""

    mode: str = "ulysses"
    vae_rank: bool = False
    # Per-layer sharded DiT weights (FSDP2) over the DiT ranks: no GPU holds the whole model (24 GB cards)
    shard_weights: bool = False


@dataclass(frozen=True)
class ServerConfig:
    """The network face: where to listen, who may connect, how many sessions at once."""

    host: str = "127.0.0.1"
    port: int = 8080
    reference: str | None = None
    prompt: str = "A person talking to the camera, natural light, looking at the viewer."
    max_sessions: int = 2
    token: str | None = None
    cert: str | None = None
    key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    ice_servers: tuple[str, ...] = ()
    max_message_bytes: int = 262144
    max_messages_per_s: float = 20.0
    stats_interval_s: float = 1.0
    max_pending_clips: int = 2  # windows queued per session beyond the one in work; older ones are dropped
    playout_margin_s: float = 0.15  # slack added to the measured generation latency before playback
    max_queued: int = 0  # offers beyond max_sessions that wait in line (told their place); 0 = refuse with busy
    connect_timeout_s: float = 20.0  # a session whose ICE/DTLS is not up by then is closed and its slot freed
    # per client address (server/client_caps.py): open websockets, offers being answered or waiting, WHEP viewers
    max_connections_per_client: int = 32  # a school or office behind one NAT address
    max_pending_offers_per_client: int = 16
    max_viewers_per_client: int = 32
    offer_timeout_s: float = 30.0  # a websocket that holds no session nor offer for this long is closed
    # the sessions API (server/sessions.py): speech bodies, idle API sessions, outputs
    max_audio_bytes: int = 20_000_000  # one speak request's audio file
    max_speech_s: float = 300.0  # speech one session may have queued (seconds of audio)
    max_text_chars: int = 2000  # one speak request's text
    tts_voice: str = "en"  # espeak-ng voice for text speech
    session_idle_timeout_s: float = 600.0  # an API session with no speech, viewer or output for this long ends
    rtmp: str | None = None  # RTMP URL the first session is pushed to (rtmp://host/app/key)
    recording_dir: str = "recordings"  # where `record: true` sessions write their fragmented MP4
    # the first session on this machine's virtual camera and microphone (server/virtualcam.py, client_cam's sinks)
    virtualcam: bool = False
    virtualcam_device: str | None = None  # camera device (/dev/videoN); none: the first v4l2loopback one; off: none
    virtualcam_mic: str = "auto"  # null sink (Linux) or output device (VB-Cable, BlackHole); auto: the default; off


@dataclass(frozen=True)
class AppConfig:
    """Everything one preset holds."""

    model: ModelConfig = field(default_factory=ModelConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @property
    def audio_sample_rate_hz(self) -> int:
        return self.model.audio_encoder.sample_rate_hz


# ----------------------------------------------------------------------------- checks

_DTYPES = ("float32", "bfloat16", "float16")
_PARALLEL_MODES = ("ulysses", "tpp")
_ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fp8")  # model/net/attention.py ATTENTION_BACKENDS
_COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")
FP8_MODES = ("none", "weights", "gemm", "tensor", "auto")  # model/net/fp8.py (auto: tensor where supported)
OFFLINE_FEATURES = ("whole_file", "window")  # model.encoders.audio
KV_UPDATE_MODES = ("clean_pass", "last_step", "per_step")
KV_CACHE_DTYPES = ("model", "float8")  # model/net/kv_quant.py
SIZINGS = ("aspect", "crop")
MOTION_MODES = ("static", "generated")
MOTION_INITS = ("still_video", "copies")
MOTION_ROPES = ("absolute", "follow")  # model/net/dit.py MOTION_ROPE_MODES
NOISE_LAYOUTS = ("per_clip", "per_block")
DECODER_PRIMES = ("still_video", "reference")
MAX_SINK_DISTANCE = 30  # the reference draws 4..30 (causal_model_s2v.py `random.randint(4, 30)`)

# Each streaming scheme as the keys it sets (a key given in the file or as a flag wins over its scheme).
STREAM_SCHEMES: dict[str, dict[str, Any]] = {
    "reference": {  # LiveAvatar's causal_s2v_pipeline_tpp.py (docs/model.md, "Inference settings")
        "sampler.kv_update": "per_step", "video.sizing": "aspect", "stream.motion": "static",
        "stream.motion_init": "still_video", "stream.motion_rope": "absolute", "stream.sink_swap": True,
        "stream.sink_distance_min": 4, "stream.sink_distance_max": MAX_SINK_DISTANCE, "stream.noise": "per_clip",
        "stream.decoder_prime": "still_video",
    },
    "ours": {  # this project's scheme before the reference one (kept for comparison, BENCHMARKS.md)
        "sampler.kv_update": "clean_pass", "video.sizing": "crop", "stream.motion": "generated",
        "stream.motion_init": "copies", "stream.motion_rope": "follow", "stream.sink_swap": False,
        "stream.sink_distance_min": MAX_SINK_DISTANCE, "stream.sink_distance_max": MAX_SINK_DISTANCE,
        "stream.noise": "per_block", "stream.decoder_prime": "reference",
    },
}


def _check(cfg: AppConfig) -> None:
    """Range checks that types alone cannot express."""
    dit = cfg.model.dit
    _require(dit.dim > 0 and dit.dim % dit.num_heads == 0, "model.dit.dim",
             f"must be a positive multiple of model.dit.num_heads ({dit.num_heads}), got {dit.dim}")
    _require((dit.dim // dit.num_heads) % 2 == 0, "model.dit.dim",
             f"head size {dit.dim // dit.num_heads} must be even for rotary embeddings")
    _require(all(0 <= i < dit.num_layers for i in dit.audio_inject_layers), "model.dit.audio_inject_layers",
             f"every layer must be in 0..{dit.num_layers - 1}, got {list(dit.audio_inject_layers)}")
    _require(dit.num_frames_per_block >= 1, "model.dit.num_frames_per_block", "must be >= 1")
    _require(dit.kv_cache_blocks >= 1, "model.dit.kv_cache_blocks", "must be >= 1")
    vae = cfg.model.vae
    _require(vae.decoder_base_dim is None or vae.decoder_base_dim >= 2, "model.vae.decoder_base_dim",
             f"must be >= 2 channels (or null: the encoder's base_dim), got {vae.decoder_base_dim}")
    _require(vae.stream_context_frames >= 0, "model.vae.stream_context_frames",
             f"must be >= 0 latent frames (0 = one continuous decoder cache), got {vae.stream_context_frames}")
    _require(vae.stream_restart_frames >= max(1, vae.stream_context_frames), "model.vae.stream_restart_frames",
             f"must be >= 1 latent frame between decoder cache restarts and >= model.vae.stream_context_frames "
             f"({vae.stream_context_frames}: one successor cache at a time), got {vae.stream_restart_frames}")
    size = cfg.video.size
    parts = size.split("*")
    _require(len(parts) == 2 and all(p.isdigit() and int(p) > 0 for p in parts), "video.size",
             f"must look like WIDTH*HEIGHT (e.g. 704*384), got {size!r}")
    w, h = int(parts[0]), int(parts[1])
    _require(w % 16 == 0 and h % 16 == 0, "video.size",
             f"width and height must be multiples of 16 (VAE 8x and patch 2x), got {size}")
    _require(cfg.video.fps > 0, "video.fps", f"must be > 0, got {cfg.video.fps}")
    _require(isinstance(cfg.video.detail_restore, bool), "video.detail_restore",
             f"must be true or false, got {cfg.video.detail_restore!r}")
    _require(cfg.video.detail_settle_s > 0, "video.detail_settle_s", f"must be > 0 s, got {cfg.video.detail_settle_s}")
    _require(cfg.video.detail_rise_s > 0, "video.detail_rise_s", f"must be > 0 s, got {cfg.video.detail_rise_s}")
    _require(cfg.video.infer_frames >= 4 and cfg.video.infer_frames % 4 == 0, "video.infer_frames",
             f"must be a positive multiple of 4 (the VAE's time stride), got {cfg.video.infer_frames}")
    latent_frames = cfg.video.infer_frames // 4
    _require(latent_frames % dit.num_frames_per_block == 0, "video.infer_frames",
             f"{cfg.video.infer_frames} frames = {latent_frames} latent frames, not a multiple of "
             f"model.dit.num_frames_per_block ({dit.num_frames_per_block})")
    _require(1 <= cfg.sampler.sample_steps <= 8, "sampler.sample_steps",
             f"must be in 1..8, got {cfg.sampler.sample_steps}")
    _require(cfg.sampler.shift > 0, "sampler.shift", f"must be > 0, got {cfg.sampler.shift}")
    _require(cfg.sampler.kv_update in KV_UPDATE_MODES, "sampler.kv_update",
             f"must be one of {KV_UPDATE_MODES}, got {cfg.sampler.kv_update!r}")
    _check_stream(cfg)
    _require(cfg.runtime.dtype in _DTYPES, "runtime.dtype", f"must be one of {_DTYPES}, got {cfg.runtime.dtype!r}")
    dev = cfg.runtime.device
    _require(dev == "cpu" or dev == "cuda" or dev.startswith("cuda:"), "runtime.device",
             f"must be 'cpu', 'cuda' or 'cuda:N', got {dev!r}")
    _require(cfg.runtime.attention_backend in _ATTENTION_BACKENDS, "runtime.attention_backend",
             f"must be one of {_ATTENTION_BACKENDS}, got {cfg.runtime.attention_backend!r}")
    _require(cfg.runtime.compile_mode in _COMPILE_MODES, "runtime.compile_mode",
             f"must be one of {_COMPILE_MODES} (CUDA-graph modes would replay stale cache addresses), "
             f"got {cfg.runtime.compile_mode!r}")
    _require(cfg.runtime.kv_cache_dtype in KV_CACHE_DTYPES, "runtime.kv_cache_dtype",
             f"must be one of {KV_CACHE_DTYPES}, got {cfg.runtime.kv_cache_dtype!r}")
    _require(cfg.runtime.fp8 in FP8_MODES, "runtime.fp8", f"must be one of {FP8_MODES}, got {cfg.runtime.fp8!r}")
    _require(cfg.runtime.fp8 == "none" or not cfg.runtime.fuse_qkv, "runtime.fuse_qkv",
             "fused QKV concatenates bf16 weights; it cannot be combined with --runtime.fp8 "
             f"{cfg.runtime.fp8} (turn one of them off)")
    _require(cfg.runtime.text_encoder_device in ("auto", "cpu"), "runtime.text_encoder_device",
             f"must be auto (the runtime device) or cpu, got {cfg.runtime.text_encoder_device!r}")
    _require(0 <= cfg.runtime.warmup_clips <= 16, "runtime.warmup_clips",
             f"must be in 0..16, got {cfg.runtime.warmup_clips}")
    _require(cfg.runtime.vae_decode_chunk >= 1, "runtime.vae_decode_chunk",
             f"must be >= 1 latent frame, got {cfg.runtime.vae_decode_chunk}")
    _require(cfg.parallel.mode in _PARALLEL_MODES, "parallel.mode",
             f"must be one of {_PARALLEL_MODES}, got {cfg.parallel.mode!r}")
    _require(cfg.parallel.mode != "tpp" or cfg.sampler.kv_update == "per_step", "sampler.kv_update",
             f"--parallel.mode tpp gives each GPU one sampling step and that step's KV window; it needs "
             f"--sampler.kv_update per_step (same frames as one process in per_step), got {cfg.sampler.kv_update!r}")
    _require(not cfg.parallel.shard_weights or cfg.parallel.mode == "ulysses", "parallel.shard_weights",
             "per-layer sharding splits the weights over the sequence-parallel ranks; --parallel.mode tpp keeps "
             "the whole model on every GPU")
    _require(not (cfg.parallel.shard_weights and cfg.parallel.vae_rank), "parallel.shard_weights",
             "the VAE rank holds no DiT shard; use one of --parallel.shard_weights and --parallel.vae_rank")
    _require(not (cfg.parallel.shard_weights and cfg.runtime.fuse_qkv), "runtime.fuse_qkv",
             "fused QKV needs whole weights; it cannot be combined with --parallel.shard_weights")
    _require(0 <= cfg.server.port <= 65535, "server.port", f"must be in 0..65535, got {cfg.server.port}")
    _require(cfg.server.max_sessions >= 1, "server.max_sessions", f"must be >= 1, got {cfg.server.max_sessions}")
    _require(cfg.server.max_pending_clips >= 1, "server.max_pending_clips",
             f"must be >= 1, got {cfg.server.max_pending_clips}")
    _require(0 <= cfg.server.playout_margin_s <= 10, "server.playout_margin_s",
             f"must be in 0..10 seconds, got {cfg.server.playout_margin_s}")
    _require(bool(cfg.server.cert) == bool(cfg.server.key), "server.cert",
             "HTTPS needs both --cert and --key (PEM files), or neither")
    _require(cfg.server.max_queued >= 0, "server.max_queued", f"must be >= 0, got {cfg.server.max_queued}")
    server = cfg.server
    _require(server.virtualcam_device is None or server.virtualcam_device.strip() != "", "server.virtualcam_device",
             "name a camera device (/dev/video10), or off")
    _require(server.virtualcam_mic.strip() != "", "server.virtualcam_mic",
             "name a null sink or output device (LiveAvatar, CABLE Input), auto or off")
    _require(not (server.virtualcam and is_off(server.virtualcam_device) and is_off(server.virtualcam_mic)),
             "server.virtualcam", "with --virtualcam_device off and --virtualcam_mic off there is nothing to publish")
    _require(cfg.server.connect_timeout_s > 0, "server.connect_timeout_s",
             f"must be > 0 seconds, got {cfg.server.connect_timeout_s}")
    for key in ("max_connections_per_client", "max_pending_offers_per_client", "max_viewers_per_client",
                "max_audio_bytes", "max_text_chars"):
        _require(getattr(cfg.server, key) >= 1, f"server.{key}", f"must be >= 1, got {getattr(cfg.server, key)}")
    for key in ("offer_timeout_s", "max_speech_s", "session_idle_timeout_s"):
        _require(getattr(cfg.server, key) > 0, f"server.{key}",
                 f"must be > 0 seconds, got {getattr(cfg.server, key)}")
    _require(cfg.server.rtmp is None or cfg.server.rtmp.startswith(("rtmp://", "rtmps://")), "server.rtmp",
             f"must be an rtmp:// or rtmps:// URL, got {cfg.server.rtmp!r}")
    _require(bool(cfg.server.tts_voice.strip()) and not cfg.server.tts_voice.startswith("-"), "server.tts_voice",
             f"must be an espeak-ng voice name (espeak-ng --voices), got {cfg.server.tts_voice!r}")
    _require(cfg.server.max_message_bytes >= 1024, "server.max_message_bytes",
             f"must be >= 1024 (an offer's SDP alone is a few KB), got {cfg.server.max_message_bytes}")
    _require(cfg.server.max_messages_per_s > 0, "server.max_messages_per_s",
             f"must be > 0, got {cfg.server.max_messages_per_s}")
    _require(cfg.server.stats_interval_s > 0, "server.stats_interval_s",
             f"must be > 0, got {cfg.server.stats_interval_s}")
    _require(cfg.audio_sample_rate_hz > 0, "model.audio_encoder.sample_rate_hz", "must be > 0")
    audio_enc = cfg.model.audio_encoder
    _require(audio_enc.context_s >= 0, "model.audio_encoder.context_s", f"must be >= 0 seconds, got {audio_enc.context_s}")
    _require(0 <= audio_enc.lookahead_s <= 5, "model.audio_encoder.lookahead_s",
             f"must be in 0..5 seconds (each second of look-ahead is a second of latency), got {audio_enc.lookahead_s}")
    _require(audio_enc.offline_features in OFFLINE_FEATURES, "model.audio_encoder.offline_features",
             f"must be one of {OFFLINE_FEATURES}, got {audio_enc.offline_features!r}")
    _require(audio_enc.whole_file_max_s >= 30, "model.audio_encoder.whole_file_max_s",
             f"must be >= 30 seconds (shorter pieces lose the whole-file context), got {audio_enc.whole_file_max_s}")
    clip_samples = cfg.video.infer_frames / cfg.video.fps * cfg.audio_sample_rate_hz
    _require(clip_samples.is_integer(), "video.fps",
             f"{cfg.video.infer_frames} frames at {cfg.video.fps} fps is {clip_samples} audio samples at "
             f"{cfg.audio_sample_rate_hz} Hz, not a whole number; pick fps/infer_frames that divide evenly")
    audio = cfg.model.audio_encoder
    _require(dit.audio_dim == audio.hidden_size, "model.dit.audio_dim",
             f"must equal model.audio_encoder.hidden_size ({audio.hidden_size}), got {dit.audio_dim}")
    _require(dit.num_audio_layers == audio.num_hidden_layers + 1, "model.dit.num_audio_layers",
             f"must be model.audio_encoder.num_hidden_layers + 1 ({audio.num_hidden_layers + 1}: every layer "
             f"plus the embedding output), got {dit.num_audio_layers}")
    text = cfg.model.text_encoder
    _require(dit.text_dim == text.d_model, "model.dit.text_dim",
             f"must equal model.text_encoder.d_model ({text.d_model}), got {dit.text_dim}")
    _require(text.text_len <= dit.text_len, "model.text_encoder.text_len",
             f"must be <= model.dit.text_len ({dit.text_len}), got {text.text_len}")


def _check_stream(cfg: AppConfig) -> None:
    """The streaming scheme's keys (`stream.*`, `video.sizing`)."""
    stream = cfg.stream
    _require(stream.scheme in STREAM_SCHEMES, "stream.scheme",
             f"must be one of {tuple(STREAM_SCHEMES)}, got {stream.scheme!r}")
    _require(cfg.video.sizing in SIZINGS, "video.sizing", f"must be one of {SIZINGS}, got {cfg.video.sizing!r}")
    for key, allowed in (("motion", MOTION_MODES), ("motion_init", MOTION_INITS), ("motion_rope", MOTION_ROPES),
                         ("noise", NOISE_LAYOUTS), ("decoder_prime", DECODER_PRIMES)):
        value = getattr(stream, key)
        _require(value in allowed, f"stream.{key}", f"must be one of {allowed}, got {value!r}")
    low, high = stream.sink_distance_min, stream.sink_distance_max
    _require(1 <= low <= MAX_SINK_DISTANCE, "stream.sink_distance_min",
             f"must be in 1..{MAX_SINK_DISTANCE} latent frames (the reference draws 4..30), got {low}")
    _require(low <= high <= MAX_SINK_DISTANCE, "stream.sink_distance_max",
             f"must be in stream.sink_distance_min ({low})..{MAX_SINK_DISTANCE} latent frames, got {high}")
    if cfg.video.sizing == "aspect":
        w, h = cfg.video.width, cfg.video.height
        _require(w * h >= 64 * 64, "video.size",
                 f"with --video.sizing aspect the size is an area budget in 64-pixel steps; {w}*{h} is below 64*64")


def apply_scheme(data: dict[str, Any]) -> dict[str, Any]:
    """Fill the keys of `stream.scheme` (default: StreamConfig's) that `data` does not give; returns `data`."""
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    stream = data.get("stream") or {}
    if not isinstance(stream, dict):
        raise ConfigError(f"--stream: expected a mapping, got {stream!r}")
    scheme = stream.get("scheme", StreamConfig.scheme)
    if scheme not in STREAM_SCHEMES:
        raise ConfigError(f"--stream.scheme: must be one of {tuple(STREAM_SCHEMES)}, got {scheme!r}")
    for dotted, value in STREAM_SCHEMES[scheme].items():
        section, key = dotted.split(".")
        node = data.setdefault(section, {})
        if isinstance(node, dict):
            node.setdefault(key, value)
    return data


def is_off(value: str | None) -> bool:
    """`off` given for a device name (YAML reads a bare off as false, which a string key keeps as 'False')."""
    return value is not None and value.strip().lower() in ("off", "false")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"--{key}: {message}")


# ----------------------------------------------------------------------------- building


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML/CLI value into the annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"--{key}: expected a mapping, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip() != ""]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"--{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"--{key}: expected {len(args)} values, got {list(value)}")
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"--{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"--{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"--{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"--{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"--{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--{key}: expected a string, got {value!r}")
        return str(value)
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"--{prefix}{unknown[0]}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _leaf_keys(cls: type, prefix: str = "") -> Iterable[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_keys(tp, prefix + f.name + ".")
        else:
            yield prefix + f.name, tp


def leaf_keys() -> dict[str, Any]:
    """Every settable key, dotted (`sampler.sample_steps`), with its type."""
    return dict(_leaf_keys(AppConfig))


def short_names() -> dict[str, str]:
    """Unique last components (`sample_steps`) mapped to their dotted key."""
    counts: dict[str, list[str]] = {}
    for dotted in leaf_keys():
        counts.setdefault(dotted.rsplit(".", 1)[-1], []).append(dotted)
    return {short: full[0] for short, full in counts.items() if len(full) == 1}


def resolve_key(name: str) -> str:
    """Map a flag name (short or dotted, `-` or `_`) to its dotted key, or raise naming it."""
    name = name.replace("-", "_")
    keys = leaf_keys()
    if name in keys:
        return name
    shorts = short_names()
    if name in shorts:
        return shorts[name]
    candidates = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if candidates:
        raise ConfigError(f"--{name}: ambiguous, use one of " + ", ".join(f"--{c}" for c in candidates))
    raise ConfigError(f"--{name}: unknown option (see --help for the list)")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--{dotted}: parent {p!r} is not a mapping")
    node[parts[-1]] = value


def flag_value(dotted: str, text: str) -> Any:
    """A flag's text as the value of key `dotted`: YAML (numbers, booleans, lists, null), except that a string
    key takes the text as typed, since a prompt or a path is prose, not YAML (`--prompt "..."`, `yes`, `a: b`);
    `null` still clears a key that may be null. Text that is not YAML is refused naming the flag."""
    if text == "":
        return text
    tp = leaf_keys().get(dotted)
    if tp is str or tp == (str | None):
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            parsed = text
        return None if parsed is None and tp is not str else text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"--{dotted}: {text!r} is not a value ({getattr(exc, 'problem', None) or exc})") from None


def set_overrides(items: Iterable[str]) -> dict[str, str]:
    """The `--set KEY=VALUE` items of a tool as overrides for `load_config` (which checks the keys and reads the
    values as flags are read)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set takes KEY=VALUE, e.g. model.vae.decoder_base_dim=8; got {item!r}")
        overrides[key.strip()] = value.strip()
    return overrides


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> AppConfig:
    """Read a preset, apply `overrides` (flag name -> value), validate, return typed config."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"--config: no such file {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config: {path} must hold a mapping at the top level")
    for name, value in (overrides or {}).items():
        dotted = resolve_key(name)
        if isinstance(value, str):
            value = flag_value(dotted, value)
        _set_dotted(data, dotted, value)
    cfg = _build(AppConfig, apply_scheme(data))
    _check(cfg)
    return cfg


def replace_key(cfg: AppConfig, dotted: str, value: Any) -> AppConfig:
    """Return `cfg` with one dotted key changed (validated again).

    Changing `stream.scheme` also resets every key of the scheme to the new scheme's value."""
    tree = dataclasses.asdict(cfg)
    if resolve_key(dotted) == "stream.scheme":
        for part in STREAM_SCHEMES.get(cfg.stream.scheme, {}):
            section, key = part.split(".")
            tree[section].pop(key, None)
    return load_config_from_dict(_set_in(tree, dotted, value))


def _set_in(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    _set_dotted(tree, resolve_key(dotted), value)
    return tree


def load_config_from_dict(data: dict[str, Any]) -> AppConfig:
    """Validate an in-memory mapping (tests and tools build configs this way)."""
    cfg = _build(AppConfig, apply_scheme(data))
    _check(cfg)
    return cfg

