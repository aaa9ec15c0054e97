"""Write the parity goldens: the reference code's own outputs at a tiny size, float32, seeded random weights.

    git clone https://github.com/Alibaba-Quark/LiveAvatar ../refsrc/LiveAvatar   # goldens made at 9c2c38de
    git clone https://github.com/Wan-Video/Wan2.2 ../refsrc/Wan2.2               # goldens made at 42bf4cfa
    .venv/bin/python tests/parity/make_goldens.py --liveavatar ../refsrc/LiveAvatar --wan ../refsrc/Wan2.2

Nothing of those repositories is copied into this project: their modules are imported from the given paths,
run on the CPU, and only inputs, weights and outputs are written (small safetensors files under
tests/parity/goldens/, with the weights in the published file layouts our loaders read).
`tests/parity/test_parity.py` checks our model against these files without any reference checkout.
Needs the reference's own dependency `einops` (requirements-dev.txt); the run takes under a minute. A rerun
gives the same tensors (only the order of the safetensors header may differ).

Which reference path each golden follows
- dit.safetensors: the multi-GPU TPP path, liveavatar/models/wan/causal_s2v_pipeline_tpp.py `generate()`
  (L931-1130), run on one process: one KV cache per denoising step (rank i owns step i, L1041, L1062), the
  sink prefill (`sink_flag`, current_start 0, L998-1025) on every step's cache, then per clip r and block b
  the four steps of FlowMatchEulerDiscreteScheduler(shift=3).set_timesteps(4) (L920-923, L1032-1041), each
  call at current_start = (r * 4 + b) * 3 latent frames (L1077-1078), the static motion latents of every clip
  (`input_motion_latents = motion_latents.clone()`, L990), and after clip 0 the sink swap: the first latent
  frame of clip 0's first finished block becomes the reference latent and every cache is prefilled again at
  r == 1 (L998-1001, L1110-1116). Noise per clip from a generator seeded seed + r (L943-960). Three clips of
  4 blocks, so the 4-block window rolls over (ring write at current_start % size, CM L283-292) and the
  motion tokens' RoPE frames stay those of the sink pass. The single-GPU path (causal_s2v_pipeline.py) is
  the same per-step scheme without the sink swap (unless --enable_online_decode).
  `relative_dist = random.randint(4, 30)` (causal_model_s2v.py L1140) is drawn from Python's `random` in
  every DiT call; the script seeds that draw (random.Random(seed)) and stores the value of each call in
  call order (`sink_distance`), so our DiT can be driven with the same distances.
- audio.safetensors: Wan2.2 `wan/modules/s2v/audio_encoder.py` `AudioEncoder.extract_audio_feat`
  (whole-file wav2vec2, every hidden state, linear 50 -> 30 Hz) and LiveAvatar's
  `get_audio_embed_bucket_fps` (its copy of that file, fps 25 as its shared_config, m = 0,
  batch_frames 48 as causal_s2v_pipeline_tpp.py `encode_audio` L447-460), then the DiT's causal audio
  encoder per 12-frame block with the reference's 73-frame prefix and 19 dropped latents (CM L1093-1104).
  The processor's audio half (Wav2Vec2FeatureExtractor, do_normalize) stands in for Wav2Vec2Processor,
  whose other half is the CTC tokenizer, unused on audio.
- vae.safetensors: the TPP path's VAE (causal_s2v_pipeline_tpp.py): the reference latent (1-frame encode,
  L885-892), the motion latents (encode of the 73-frame still video, L896-898) and the online decode
  (L1118-1130): the stream decoder primed with motion_latents[:, :, :7] (output dropped), then one
  stream_decode per block, keeping its last 12 frames, and the first block drops 3 more. The VAE is
  LiveAvatar's wan_2_2/modules/vae_streaming.py WanVAE (what the TPP pipeline imports, L46): Wan2.2's
  `wan/modules/vae2_1.py` WanVAE_ plus stream_encode/stream_decode; the script checks that Wan2.2's own
  WanVAE_ with the same weights decodes the same latents to the same frames.

CPU stand-ins and the two precision quirks (patched at import, inside this script only)
- flash_attn / cuDNN attention -> torch SDPA in float32 (`attention`, `flash_attention` of every reference
  module); `.to("cuda")` of the RoPE table -> CPU; torch.compile off (ENABLE_COMPILE=false); librosa and
  decord stubbed where only imported (librosa.load hands over the script's audio); `_forward_sink`'s empty
  noisy-token tensor takes the model's width instead of a hard-coded 5120 (CM L864).
- Neutralised, so the goldens are the reference's float32 math: (1) the cast to bfloat16 before the text
  cross-attention norm (causal_model_s2v.py L423 `self.norm3(x.to(torch.bfloat16))`, ~3e-4 by itself) and
  (2) the float16 RoPE tables (LiveAvatar wan_2_2/modules/s2v/s2v_utils.py L16 `.to(torch.float16)`, ~1e-5):
  both functions are re-compiled from the reference's own source with that one expression replaced.
  `--keep-quirk bf16_norm` / `--keep-quirk fp16_rope` leave one in, to measure it (--out elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import inspect
import json
import math
import os
import random
import sys
import textwrap
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

GOLDEN_DIR = Path(__file__).resolve().parent / "goldens"
SEED = 20261202

# The tiny DiT (our DiTConfig field names). audio_dim = the tiny wav2vec2's width; 25 audio layers because the
# reference's CausalAudioEncoder keeps its default num_layers=25 (wav2vec2 embeddings + 24 layers).
DIT = {
    "dim": 32, "ffn_dim": 64, "num_heads": 2, "num_layers": 4, "freq_dim": 32, "text_dim": 32, "text_len": 16,
    "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "eps": 1e-6, "qk_norm": True,
    "cross_attn_norm": True, "audio_dim": 16, "audio_inject_layers": [0, 2], "num_audio_layers": 25,
    "cond_dim": 16, "num_frames_per_block": 3, "kv_cache_blocks": 4,
}
LATENT_HW = (8, 16)  # non-square, so a swapped h/w shows
TEXT_TOKENS = 5
CLIPS = 3
INFER_FRAMES = 48  # video frames per clip (infinite_inference_multi_gpu.sh --infer_frames 48)
MOTION_FRAMES = 73  # video; (73 + 3) // 4 = 19 latent frames
STEPS, SHIFT = 4, 3.0
FPS = 25
# wav2vec2-large-xlsr-53 layout (layer-norm conv stack, stable layer norm), tiny widths, 24 layers.
WAV2VEC2 = {
    "hidden_size": 16, "num_hidden_layers": 24, "num_attention_heads": 2, "intermediate_size": 32,
    "conv_dim": [16, 16, 16, 16, 16, 16, 16],
}
AUDIO_SECONDS = 2.5
VAE = {"dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 1,
       "temperal_downsample": [False, True, True]}
VAE_LATENT_HW = (4, 6)
VAE_BLOCKS = 3  # 3 latent frames each: the first block (3 frames dropped) and two more


# ----------------------------------------------------------------------------- importing the reference


def _namespace(name: str, path: Path) -> None:
    """A package whose __init__ is not run (the reference's pull in pipelines, CUDA, decord...)."""
    module = types.ModuleType(name)
    module.__path__ = [str(path)]
    sys.modules[name] = module


def _stub(name: str) -> None:
    """An empty module for a package the reference only imports (never calls on the paths run here)."""
    if name not in sys.modules and importlib.util.find_spec(name) is None:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = module


def sdpa_attention(q, k, v, *args, **kwargs):
    """[B, L, H, D] attention in the inputs' dtype (float32 here) over all keys: the reference's calls pass
    full lengths (k_lens = everything in the cache, no window), so no mask is needed."""
    assert kwargs.get("causal", False) is False and kwargs.get("window_size", (-1, -1)) == (-1, -1)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


def _recompile(function, replacements: list[tuple[str, str]]):
    """The reference function re-built from its own source with exact text replacements (each must hit)."""
    source = textwrap.dedent(inspect.getsource(function))
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("@"))
    for old, new in replacements:
        if old not in source:
            raise RuntimeError(f"{function.__qualname__}: expected {old!r} in the reference source")
        source = source.replace(old, new)
    namespace = dict(function.__globals__)
    exec(compile(source, inspect.getsourcefile(function), "exec"), namespace)  # noqa: S102
    return namespace[function.__name__]


def load_liveavatar(root: Path, keep_quirks: tuple[str, ...] = ()) -> types.SimpleNamespace:
    """LiveAvatar's causal DiT modules, CPU-ready, float32 math (see the module docstring); `keep_quirks`
    leaves "bf16_norm" and/or "fp16_rope" as the reference has them."""
    os.environ["ENABLE_COMPILE"] = "false"
    for name in ("librosa", "decord"):
        _stub(name)
    sys.path.insert(0, str(root))
    base = root / "liveavatar"
    for name, path in [
        ("liveavatar", base), ("liveavatar.models", base / "models"),
        ("liveavatar.models.wan", base / "models/wan"),
        ("liveavatar.models.wan.wan_2_2", base / "models/wan/wan_2_2"),
        ("liveavatar.models.wan.wan_2_2.modules", base / "models/wan/wan_2_2/modules"),
        ("liveavatar.models.wan.wan_2_2.modules.s2v", base / "models/wan/wan_2_2/modules/s2v"),
        ("liveavatar.models.wan.wan_2_2.distributed", base / "models/wan/wan_2_2/distributed"),
    ]:
        _namespace(name, path)
    cm = importlib.import_module("liveavatar.models.wan.causal_model_s2v")
    s2v_utils = importlib.import_module("liveavatar.models.wan.wan_2_2.modules.s2v.s2v_utils")
    motioner = importlib.import_module("liveavatar.models.wan.causal_motioner")
    audio_encoder = importlib.import_module("liveavatar.models.wan.wan_2_2.modules.s2v.audio_encoder")
    # quirk 2: float16 RoPE tables -> float64 (the table the rest of the function and rope_apply use)
    if "fp16_rope" not in keep_quirks:
        wide = [(".to(torch.float16)", ".to(torch.float64)")]
        rope_precompute = _recompile(s2v_utils.rope_precompute, wide)
        for module in (s2v_utils, cm, motioner):
            module.rope_precompute = rope_precompute
    # quirk 1: the bfloat16 cast before the text cross-attention norm
    if "bf16_norm" not in keep_quirks:
        block = cm.CausalWanS2VAttentionBlock
        block.forward = _recompile(block.forward, [("self.norm3(x.to(torch.bfloat16))", "self.norm3(x)")])
    _patch_attention()
    return types.SimpleNamespace(cm=cm, audio_encoder=audio_encoder)


def load_wan(root: Path) -> types.SimpleNamespace:
    """Wan2.2's audio encoder helpers and Wan2.1 VAE (imported under the package name `wan`)."""
    for name in ("librosa", "decord"):
        _stub(name)
    sys.path.insert(0, str(root))
    _namespace("wan", root / "wan")
    _namespace("wan.modules", root / "wan/modules")
    _namespace("wan.modules.s2v", root / "wan/modules/s2v")
    audio_encoder = importlib.import_module("wan.modules.s2v.audio_encoder")
    audio_utils = importlib.import_module("wan.modules.s2v.audio_utils")
    vae2_1 = importlib.import_module("wan.modules.vae2_1")
    _patch_attention()
    return types.SimpleNamespace(audio_encoder=audio_encoder, audio_utils=audio_utils, vae2_1=vae2_1)


def _patch_attention() -> None:
    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if name.startswith(("liveavatar", "wan.")):
            for attr in ("attention", "flash_attention"):
                if callable(getattr(module, attr, None)) and attr in vars(module):
                    setattr(module, attr, sdpa_attention)


class _CpuTables:
    """`CausalWanModel_S2V.__init__` puts its RoPE table on "cuda": keep it on the CPU while building."""

    def __enter__(self):
        self.original = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            args = tuple("cpu" if a == "cuda" else a for a in args)
            return self.original(tensor, *args, **kwargs)

        torch.Tensor.to = to

    def __exit__(self, *exc):
        torch.Tensor.to = self.original


def seeded_(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (zero-initialised ones too, so every path carries signal), in name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim >= 2:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
            elif name.endswith("weight"):  # norms
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


# ----------------------------------------------------------------------------- the DiT


def build_reference_dit(ref: types.SimpleNamespace) -> torch.nn.Module:
    """`CausalWanModel_S2V` with the 14B config's switches (wan_s2v_14B_modified.py) at the tiny size."""
    with _CpuTables():
        model = ref.cm.CausalWanModel_S2V(
            cond_dim=DIT["cond_dim"], audio_dim=DIT["audio_dim"], num_audio_token=4, enable_adain=True,
            adain_mode="attn_norm", audio_inject_layers=DIT["audio_inject_layers"], zero_init=True,
            zero_timestep=True, enable_motioner=False, add_last_motion=True, enable_tsm=False,
            enable_framepack=True, framepack_drop_mode="padd", model_type="s2v", patch_size=(1, 2, 2),
            text_len=DIT["text_len"], in_dim=16, dim=DIT["dim"], ffn_dim=DIT["ffn_dim"],
            freq_dim=DIT["freq_dim"],
            text_dim=DIT["text_dim"], out_dim=16, num_heads=DIT["num_heads"], num_layers=DIT["num_layers"],
            window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
        )
    seeded_(model, SEED)
    return model.eval().float()


def _sink_forward_fix(ref: types.SimpleNamespace) -> None:
    """`_forward_sink` builds its empty noisy-token tensor with a hard-coded width of 5120 (the 14B dim); at
    another width the concatenation with the reference tokens fails. Same tensor, the model's width."""
    cm = ref.cm.CausalWanModel_S2V
    if not getattr(cm, "_tiny_width", False):
        width = [("torch.zeros([1,5120,nf,", "torch.zeros([1,self.dim,nf,")]
        cm._forward_sink = _recompile(cm._forward_sink, width)
        cm._tiny_width = True


def new_reference_cache(model, block_tokens: int, sink_tokens: int) -> list[dict]:
    """One step's caches as causal_s2v_pipeline_tpp.py `_initialize_kv_cache` (L605-619), tiny shapes:
    k/v hold one clip (kv_cache_blocks blocks), cond_k/cond_v the sink."""
    heads, head_dim = model.num_heads, model.dim // model.num_heads
    size = DIT["kv_cache_blocks"] * block_tokens
    return [{
        "k": torch.zeros(1, size, heads, head_dim), "v": torch.zeros(1, size, heads, head_dim),
        "cond_k": torch.zeros(1, sink_tokens + 8, heads, head_dim),
        "cond_v": torch.zeros(1, sink_tokens + 8, heads, head_dim),
        "cond_end": torch.tensor([0], dtype=torch.long),
    } for _ in range(model.num_layers)]


def make_dit_golden(ref: types.SimpleNamespace, out: Path) -> dict[str, torch.Tensor]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    _sink_forward_fix(ref)
    model = build_reference_dit(ref)
    weights_dir = out / "dit_checkpoint"
    weights_dir.mkdir(parents=True, exist_ok=True)
    # the published layout: one diffusion_pytorch_model.safetensors with Wan2.2/LiveAvatar module names
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(weights_dir / "diffusion_pytorch_model.safetensors"))

    h, w = LATENT_HW
    f = DIT["num_frames_per_block"]
    g = torch.Generator().manual_seed(SEED + 1)
    ref_latent = torch.randn(1, 16, 1, h, w, generator=g)
    motion_latents = torch.randn(1, 16, (MOTION_FRAMES + 3) // 4, h, w, generator=g)
    text = torch.randn(TEXT_TOKENS, DIT["text_dim"], generator=g)
    audio = torch.randn(1, DIT["num_audio_layers"], DIT["audio_dim"], CLIPS * INFER_FRAMES, generator=g)
    lat_frames = (INFER_FRAMES + 3 + MOTION_FRAMES) // 4 - (MOTION_FRAMES + 3) // 4  # 12 (L945-946)
    num_blocks = lat_frames // f
    noise = torch.stack([  # one randn of the clip per clip, generator seeded seed + r (L943-960)
        torch.randn(16, lat_frames, h, w, generator=torch.Generator().manual_seed(SEED + r))
        for r in range(CLIPS)
    ])
    frame_tokens = (h // 2) * (w // 2)
    block_tokens = f * frame_tokens

    draws: list[int] = []
    rng = random.Random(SEED)
    original_randint = random.randint

    def recorded_randint(a, b):
        value = rng.randint(a, b)
        draws.append(value)
        return value

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(STEPS)
    timesteps, sigmas = scheduler.timesteps.clone(), scheduler.sigmas.clone()
    caches, cross = None, [{} for _ in range(model.num_layers)]
    velocities, finished = [], []
    sink_refs = [ref_latent]
    current_ref = ref_latent
    random.randint = recorded_randint
    try:
        with torch.no_grad():
            for r in range(CLIPS):
                clip = noise[r].clone()
                audio_clip = audio[..., r * INFER_FRAMES:(r + 1) * INFER_FRAMES]
                cond = torch.zeros(1, 16, lat_frames, h, w)
                if r in (0, 1):  # sink prefill on every step's cache (L991-1025); at r == 1 the new reference
                    if r == 1:
                        current_ref = finished[0][:, :, 0:1].clone()
                        sink_refs.append(current_ref)
                    if caches is None:
                        sink_tokens = frame_tokens + _motion_tokens(h, w)
                        caches = [new_reference_cache(model, block_tokens, sink_tokens) for _ in range(STEPS)]
                    for cache in caches:
                        model([clip[:, :f]], t=torch.zeros(1, f), context=[text], seq_len=None,
                              ref_latents=current_ref, motion_latents=motion_latents,
                              cond_states=cond[:, :, :f],
                              audio_input=audio_clip[..., :4 * f], motion_frames=[MOTION_FRAMES, 19],
                              drop_motion_frames=False, sink_flag=True, kv_cache=cache, crossattn_cache=cross,
                              current_start=0, current_end=block_tokens)
                for b in range(num_blocks):
                    x = clip[:, b * f:(b + 1) * f]
                    start = (r * num_blocks + b) * block_tokens
                    for i, t in enumerate(timesteps):
                        v = model([x], t=torch.full((1, f), float(t)), context=[text], seq_len=None,
                                  ref_latents=current_ref, motion_latents=motion_latents,
                                  cond_states=cond[:, :, b * f:(b + 1) * f],
                                  audio_input=audio_clip[..., b * 4 * f:(b + 1) * 4 * f],
                                  motion_frames=[MOTION_FRAMES, 19], drop_motion_frames=False,
                                  kv_cache=caches[i], crossattn_cache=cross, current_start=start,
                                  current_end=start + block_tokens)[0]
                        scheduler._step_index = i  # TPP: rank i does step i (L1041)
                        x = scheduler.step(v.unsqueeze(0), t, x.unsqueeze(0), return_dict=False)[0].squeeze(0)
                        velocities.append(v.clone())
                    finished.append(x.unsqueeze(0).clone())
    finally:
        random.randint = original_randint

    shape = (CLIPS, num_blocks, STEPS, 16, f, h, w)
    tensors = {
        "ref_latent": ref_latent, "motion_latents": motion_latents, "text": text, "audio": audio,
        "noise": noise,
        "timesteps": timesteps.float(), "sigmas": sigmas.float(),
        "sink_distance": torch.tensor(draws, dtype=torch.int64).reshape(CLIPS, num_blocks, STEPS),
        "velocity": torch.stack(velocities).reshape(shape),
        "latents": torch.stack(finished).reshape(CLIPS, num_blocks, 16, f, h, w),  # each block's clean output
        "swapped_ref_latent": sink_refs[1],
    }
    meta = {"dit": json.dumps(DIT), "latent_hw": json.dumps(LATENT_HW), "clips": str(CLIPS),
            "seed": str(SEED),
            "infer_frames": str(INFER_FRAMES), "steps": str(STEPS), "shift": str(SHIFT),
            "path": "causal_s2v_pipeline_tpp.py (per-step caches, sink swap after clip 0)"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "dit.safetensors"), metadata=meta)
    return tensors


def _motion_tokens(h: int, w: int) -> int:
    """FramePack tokens: 1 frame at 1/2, 2 frames at 1/4 -> 1, 16 frames at 1/8 -> 4 (causal_motioner.py)."""
    return (h // 2) * (w // 2) + (h // 4) * (w // 4) + 4 * (h // 8) * (w // 8)


# ----------------------------------------------------------------------------- the audio path


def build_wav2vec2():
    """A Wav2Vec2ForCTC of the xlsr-53 layout (layer-norm conv stack, stable layer norm) at a tiny width."""
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    config = Wav2Vec2Config(**WAV2VEC2, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                            vocab_size=8, mask_time_prob=0.0)
    torch.manual_seed(SEED + 2)
    model = Wav2Vec2ForCTC(config)
    seeded_(model, SEED + 2)
    return model.eval()


def speech_like(seconds: float, rate: int = 16000) -> np.ndarray:
    """Voiced-like audio: a gliding harmonic tone under a syllable envelope, plus noise (seeded)."""
    rng = np.random.default_rng(SEED + 3)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 140 + 40 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.1 * t) ** 2
    return (0.3 * voiced * envelope + 0.02 * rng.standard_normal(t.shape)).astype(np.float32)


def make_audio_golden(live: types.SimpleNamespace, wan: types.SimpleNamespace, out: Path) -> None:
    from transformers import Wav2Vec2FeatureExtractor

    ctc = build_wav2vec2()
    folder = out / "audio_checkpoint" / "wav2vec2-large-xlsr-53-english"
    ctc.save_pretrained(str(folder))  # the published folder: a Wav2Vec2ForCTC save (config.json + weights)
    samples = speech_like(AUDIO_SECONDS)
    sys.modules["librosa"].load = lambda path, sr: (samples, sr)  # how extract_audio_feat reads the file
    encoder = wan.audio_encoder.AudioEncoder.__new__(wan.audio_encoder.AudioEncoder)
    encoder.processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                                 do_normalize=True, return_attention_mask=True)
    encoder.model, encoder.video_rate = ctc, 30
    with torch.no_grad():
        normalised = encoder.processor(samples, sampling_rate=16000, return_tensors="pt").input_values
        hidden_50hz = torch.cat(ctc(normalised, output_hidden_states=True).hidden_states)  # [25, T50, C]
        features_30hz = encoder.extract_audio_feat("speech.wav", return_all_layers=True)  # Wan2.2
        # LiveAvatar's bucketing (its copy of audio_encoder.py), as encode_audio calls it: fps 25, m 0
        bucket, clips = live.audio_encoder.AudioEncoder.get_audio_embed_bucket_fps(
            encoder, features_30hz, fps=FPS, batch_frames=INFER_FRAMES, m=0)
        audio_emb = bucket.unsqueeze(0).permute(0, 2, 3, 1)  # [1, layers, C, frames] (encode_audio L455-459)
        dit = build_reference_dit(live)  # the DiT golden's weights: its causal audio encoder
        f = DIT["num_frames_per_block"]
        glob, local = [], []
        for clip in range(clips):
            clip_audio = audio_emb[..., clip * INFER_FRAMES:(clip + 1) * INFER_FRAMES]
            for block in range(INFER_FRAMES // (4 * f)):
                block_audio = clip_audio[..., block * 4 * f:(block + 1) * 4 * f]
                # _forward_inference L1093-1104: 73 copies of the first frame before, 19 latents dropped
                prefix = block_audio[..., 0:1].repeat(1, 1, 1, MOTION_FRAMES)
                prefixed = torch.cat([prefix, block_audio], dim=-1)
                g, loc = dit.casual_audio_encoder(prefixed)
                glob.append(g[:, 19:])
                local.append(loc[:, 19:])
    tensors = {
        "samples": torch.from_numpy(samples), "hidden_50hz": hidden_50hz, "features_30hz": features_30hz,
        "bucket": bucket, "block_global": torch.cat(glob), "block_local": torch.cat(local),
    }
    meta = {"wav2vec2": json.dumps(WAV2VEC2), "fps": str(FPS), "infer_frames": str(INFER_FRAMES),
            "clips": str(clips), "dit": json.dumps(DIT)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "audio.safetensors"), metadata=meta)


# ----------------------------------------------------------------------------- the VAE


def smooth_image(h: int, w: int) -> torch.Tensor:
    """An image-like [1, 3, 1, H, W] in [-1, 1]: low-frequency colour fields plus a little noise (seeded)."""
    g = torch.Generator().manual_seed(SEED + 5)
    coarse = torch.rand(1, 3, 4, 6, generator=g) * 2 - 1
    image = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
    image = image + 0.05 * torch.randn(1, 3, h, w, generator=g)
    return image.clamp(-1, 1).unsqueeze(2)


def make_vae_golden(live: types.SimpleNamespace, wan: types.SimpleNamespace, out: Path) -> None:
    """LiveAvatar's WanVAE (wan_2_2/modules/vae_streaming.py: Wan2.2's vae2_1.py WanVAE_ plus stream_decode),
    tiny, default init under a seed; the TPP path's encodes and online decode."""
    vs = importlib.import_module("liveavatar.models.wan.wan_2_2.modules.vae_streaming")
    torch.manual_seed(SEED + 4)
    tiny = vs.WanVAE_(attn_scales=[], dropout=0.0, **VAE).eval()
    folder = out / "vae_checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(tiny.state_dict(), folder / "Wan2.1_VAE.pth")  # the published file, Wan's own names
    original = vs._video_vae
    vs._video_vae = lambda pretrained_path, z_dim: tiny  # WanVAE's __init__ would build the 96-wide VAE
    try:
        vae = vs.WanVAE(z_dim=16, vae_pth=str(folder / "Wan2.1_VAE.pth"), dtype=torch.float32, device="cpu")
    finally:
        vs._video_vae = original
    h, w = VAE_LATENT_HW
    image = smooth_image(8 * h, 8 * w)
    f = DIT["num_frames_per_block"]
    g = torch.Generator().manual_seed(SEED + 6)
    blocks = torch.randn(VAE_BLOCKS, 1, 16, f, h, w, generator=g)
    frames_per_block = INFER_FRAMES // (INFER_FRAMES // (4 * f))  # infer_frames // num_blocks
    with torch.no_grad():
        ref_latent = torch.stack(vae.encode(image))  # 1 frame -> 1 latent (L885-892)
        motion_latents = torch.stack(vae.encode(image.repeat(1, 1, MOTION_FRAMES, 1, 1)))  # (L896-898)
        vae.stream_decode(motion_latents[:, :, :7])  # priming, output dropped (L1119-1121)
        video = []
        for block in range(VAE_BLOCKS):
            frames = torch.stack(vae.stream_decode(blocks[block]))[:, :, -frames_per_block:]  # L1124-1125
            video.append(frames[:, :, 3:] if block == 0 else frames)  # the first block drops 3 (L1127-1128)
        # Wan2.2's WanVAE_ (same weights), one whole decode of the same latents: the same frames
        wan_vae = wan.vae2_1.WanVAE_(attn_scales=[], dropout=0.0, **VAE).eval()
        wan_vae.load_state_dict(tiny.state_dict())
        whole = torch.cat([motion_latents[:, :, :7], *blocks], dim=2)
        frames = wan_vae.decode(whole, vae.scale).clamp(-1, 1)[:, :, -VAE_BLOCKS * frames_per_block + 3:]
        gap = float((frames - torch.cat(video, dim=2)).abs().max())
        if gap > 1e-5:
            raise RuntimeError(f"Wan2.2's vae2_1 decode differs from LiveAvatar's stream decode by {gap}")
    tensors = {"image": image, "ref_latent": ref_latent, "motion_latents": motion_latents,
               "block_latents": blocks, "video": torch.cat(video, dim=2)}
    meta = {"vae": json.dumps(VAE), "frames_dropped_first_block": "3", "prime_latents": "7"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "vae.safetensors"), metadata=meta)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--liveavatar", type=Path, required=True, help="checkout of Alibaba-Quark/LiveAvatar")
    parser.add_argument("--wan", type=Path, required=True, help="checkout of Wan-Video/Wan2.2")
    parser.add_argument("--out", type=Path, default=GOLDEN_DIR)
    parser.add_argument("--keep-quirk", action="append", choices=("bf16_norm", "fp16_rope"), default=[],
                        help="leave a reference precision quirk in (to measure it; not for the goldens)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # the reference's deprecated torch.cuda.amp decorators, on every call
    args.out.mkdir(parents=True, exist_ok=True)
    live = load_liveavatar(args.liveavatar.resolve(), tuple(args.keep_quirk))
    wan = load_wan(args.wan.resolve())
    make_dit_golden(live, args.out)
    make_audio_golden(live, wan, args.out)
    make_vae_golden(live, wan, args.out)
    print(f"wrote {sorted(p.name for p in args.out.iterdir())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
