"""Print the relative error of every parity comparison (what test_parity.py asserts < 1e-4), and of the
options that differ from the reference, so a change shows by how much it moves us off the reference code.

    .venv/bin/python tests/parity/errors.py [--goldens DIR]

DIR defaults to tests/parity/goldens; goldens written with `make_goldens.py --keep-quirk ...` measure what a
precision quirk of the reference costs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tests.parity.test_parity as tp
from model.io_types import AudioWindow


def _sized(cls, sizes: dict):
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in sizes.items()})


def dit_errors(motion_rope: str = "absolute", recorded_distances: bool = True, sink_swap: bool = True) -> str:
    golden, meta = tp._read("dit.safetensors")
    dit = tp.load_dit(_sized(tp.DiTConfig, json.loads(meta["dit"])), tp.GOLDENS / "dit_checkpoint")
    drive = tp.ReferenceDrive(dit, golden, meta)
    drive.rings = [dit.new_cache(1, "cpu", torch.float32, motion_rope=motion_rope) for _ in drive.rings]
    if not recorded_distances:  # the DiT's fixed rule: reference sink 30 frames ahead
        drive.g = {**golden, "sink_distance": torch.full_like(golden["sink_distance"], 30)}
    latents, velocities = [], []
    with torch.inference_mode():
        drive.prefill(golden["ref_latent"])
        first = tp.relative_error(drive.call(golden["noise"][0][None, :, : drive.f], 0, 0, 0)[0],
                                  golden["velocity"][0, 0, 0])
        drive = tp.ReferenceDrive(dit, drive.g, meta)
        drive.rings = [dit.new_cache(1, "cpu", torch.float32, motion_rope=motion_rope) for _ in drive.rings]
        drive.prefill(golden["ref_latent"])
        for clip in range(golden["noise"].shape[0]):
            if clip == 1 and sink_swap:
                drive.prefill(latents[0][:, :, 0:1])
            for block in range(drive.blocks):
                x, v = drive.block(clip, block)
                latents.append(x)
                velocities.extend(v)
    v = torch.stack(velocities).reshape(golden["velocity"].shape)
    lat = torch.cat(latents).reshape(golden["latents"].shape)
    clips, blocks, steps = v.shape[:3]
    per_call = [[tp.relative_error(v[c, b, s], golden["velocity"][c, b, s]) for b in range(blocks)
                 for s in range(steps)] for c in range(clips)]
    per_clip = [tp.relative_error(lat[c], golden["latents"][c]) for c in range(clips)]
    worst = max(max(c) for c in per_call)
    clips_text = ", ".join(f"{e:.2e}" for e in per_clip)
    return (f"first call {first:.2e}; clip 0 worst velocity {max(per_call[0]):.2e}; "
            f"three clips worst velocity {worst:.2e}; latents per clip {clips_text}")


def audio_errors() -> list[str]:
    golden, meta = tp._read("audio.safetensors")
    cfg = _sized(tp.AudioEncoderConfig, json.loads(meta["wav2vec2"]))
    encoder = tp.AudioEncoder.build(cfg)
    tp.load_wav2vec2(encoder.model, tp.GOLDENS / "audio_checkpoint", cfg)
    samples = golden["samples"].numpy()
    hidden = encoder.hidden_states(samples)
    fps, frames = float(meta["fps"]), golden["bucket"].shape[0]
    rows = tp.reference_frame_rows(hidden, fps, frames)
    audio_frames = int(len(samples) / 16000 * fps)
    linear = encoder.encode_window(AudioWindow(samples, 0, 0.0, 0), fps, audio_frames)
    _, dmeta = tp._read("dit.safetensors")
    dit = tp.load_dit(_sized(tp.DiTConfig, json.loads(dmeta["dit"])), tp.GOLDENS / "dit_checkpoint")
    f = dit.cfg.num_frames_per_block
    glob, local = [], []
    with torch.inference_mode():
        for block in range(golden["block_global"].shape[0]):
            g, loc = dit.casual_audio_encoder(golden["bucket"][block * 4 * f : (block + 1) * 4 * f][None])
            glob.append(tp.relative_error(g[0], golden["block_global"][block]))
            local.append(tp.relative_error(loc[0], golden["block_local"][block]))
    hidden_error = tp.relative_error(hidden.transpose(0, 1), golden["hidden_50hz"])
    linear_error = tp.relative_error(linear, golden["bucket"][:audio_frames])
    return [
        f"wav2vec2 hidden states, whole file: {hidden_error:.2e}",
        f"rows per frame, reference_frame_rows: {tp.relative_error(rows, golden['bucket']):.2e}",
        f"rows per frame, the live path's linear interpolation (frames with audio): {linear_error:.2e}",
        f"causal audio encoder per block: global {max(glob):.2e}, local {max(local):.2e}",
    ]


def vae_errors() -> list[str]:
    golden, meta = tp._read("vae.safetensors")
    sizes = json.loads(meta["vae"])
    cfg = tp.VAEConfig(base_dim=sizes["dim"], z_dim=sizes["z_dim"], dim_mult=tuple(sizes["dim_mult"]),
                       num_res_blocks=sizes["num_res_blocks"],
                       temporal_downsample=tuple(sizes["temperal_downsample"]))
    model = tp.build_vae(cfg)
    tp.load_wan_vae(model, tp.GOLDENS / "vae_checkpoint", cfg)
    vae = tp.AvatarVAE(model)
    image = golden["image"]
    still = image.repeat(1, 1, 73, 1, 1)
    ref_error = tp.relative_error(vae.encode_reference(image[:, :, 0]), golden["ref_latent"])
    still_error = tp.relative_error(vae.encode_video(still), golden["motion_latents"])
    lines = [f"reference latent {ref_error:.2e}; 73-frame still video {still_error:.2e}"]
    for name, prime in (("7 still-video latents (the reference)", golden["motion_latents"][:, :, :7]),
                        ("the reference latent alone", golden["ref_latent"])):
        decoder = vae.new_decoder(prime, context_frames=0)
        video = [frames[:, :, 3:] if block == 0 else frames
                 for block, frames in enumerate(decoder.decode(b) for b in golden["block_latents"])]
        lines.append(f"stream decode primed with {name}: "
                     f"{tp.relative_error(torch.cat(video, dim=2), golden['video']):.2e}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goldens", type=Path, default=tp.GOLDENS)
    args = parser.parse_args(argv)
    tp.GOLDENS = args.goldens
    torch.set_num_threads(1)
    print("DiT, as the reference runs:", dit_errors())
    print("DiT, motion_rope follow:", dit_errors(motion_rope="follow"))
    print("DiT, sink 30 frames ahead:", dit_errors(recorded_distances=False))
    print("DiT, no sink swap:", dit_errors(sink_swap=False))
    for line in audio_errors():
        print("audio,", line)
    for line in vae_errors():
        print("VAE,", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
