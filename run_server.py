#!/usr/bin/env python3
"""Start the live avatar server, or render a long video offline.

    python run_server.py [serve] [--config configs/tiny.yaml] [--host H] [--port P] [--KEY VALUE ...]
    python run_server.py offline --audio speech.wav [--image ref.png] --out out.mp4 [--num_clip N] [--KEY VALUE ...]
    python run_server.py cluster --replicas N [--address auto|ray://HEAD:10001|none] [--gpus_per_replica G] [...]

Every config key is a flag: `--sample_steps 2`, `--sampler.sample_steps 2`, `--video.size 256*256`.
Under `torchrun --nproc-per-node N`, rank 0 serves and the other ranks run the DiT.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from model.config import AppConfig, ConfigError, leaf_keys, load_config, resolve_key

COMMANDS = ("serve", "offline", "cluster")


def split_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """Turn leftover `--key value` / `--key=value` pairs into config overrides (names checked)."""
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        token = extra[i]
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r}: options look like --KEY VALUE")
        name, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                value = extra[i + 1]
                i += 1
            elif leaf_keys().get(resolve_key(name)) is bool:
                value = "true"  # a bare boolean flag: --virtualcam
            else:
                raise ConfigError(f"--{name}: needs a value")
        overrides[resolve_key(name)] = value
        i += 1
    return overrides


def build_parser(command: str) -> argparse.ArgumentParser:
    """Flags that are not config keys (file paths of one run), plus --config."""
    keys = "\n  ".join(f"--{k}" for k in leaf_keys())
    parser = argparse.ArgumentParser(
        prog=f"run_server.py {command}",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (each may be given as a flag):\n  {keys}",
    )
    parser.add_argument("--config", default=None, help="YAML preset (default: configs/tiny.yaml)")
    if command == "offline":
        parser.add_argument("--audio", required=True, help="speech file (wav/mp3/...) driving the avatar")
        parser.add_argument("--image", default=None,
                            help="reference image (the avatar's identity; default: --server.reference, else the "
                                 "server's drawn face)")
        parser.add_argument("--out", required=True, help="output .mp4")
        parser.add_argument("--num_clip", type=int, default=None, help="stop after N clips (default: whole audio)")
        parser.add_argument("--prompt_text", default=None, help="text prompt (default: server.prompt)")
    if command == "cluster":
        from cluster.launch import add_cluster_flags

        add_cluster_flags(parser)
    return parser


def parse_args(argv: Sequence[str]) -> tuple[str, argparse.Namespace, AppConfig]:
    """Parse the command line into (command, run flags, validated config)."""
    argv = list(argv)
    command = "serve"
    if argv and argv[0] in COMMANDS:
        command = argv.pop(0)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    cfg = load_config(args.config, split_overrides(extra))
    return command, args, cfg


def main(argv: Sequence[str] | None = None) -> int:
    try:
        command, args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if command != "cluster" and not weights_ready(cfg):
        return 2
    if command == "offline":
        from offline.render import run_offline

        return run_offline(cfg, args)
    if command == "cluster":
        from cluster.launch import run_cluster

        return run_cluster(cfg, args)
    from model.parallel.group import read_launch_env

    launch = read_launch_env()
    if launch.rank == 0 and not virtualcam_ready(cfg):
        return 1
    if launch.world_size > 1:
        return serve_in_group(cfg)
    from server.app import serve

    return serve(cfg)


def weights_ready(cfg: AppConfig) -> bool:
    """The checkpoint and LoRA named by the config exist (paths or hub ids in the local cache) before anything
    loads or listens; if not, one error that says what is missing and how to download it."""
    from model.weights.hub import WeightsNotFound, check_weights

    try:
        check_weights(cfg.model.checkpoint, cfg.model.lora)
    except WeightsNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def virtualcam_ready(cfg: AppConfig) -> bool:
    """With --virtualcam, the camera device and the microphone's tools must be there before the model loads."""
    if not cfg.server.virtualcam:
        return True
    from client_cam.errors import ClientError
    from server.virtualcam import check_virtualcam

    try:
        check_virtualcam(cfg)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return False
    return True


def serve_in_group(cfg: AppConfig) -> int:
    """Under torchrun: rank 0 serves and drives the DiT; the other ranks run their share of each clip."""
    from model.parallel.followers import follow, release_followers
    from model.parallel.group import LaunchError, start_group_from_config

    if cfg.parallel.vae_rank:
        print("error: --parallel.vae_rank true is not served yet (bench/gpu_bench.py measures it); "
              "launch with --parallel.vae_rank false", file=sys.stderr)
        return 2
    try:
        group = start_group_from_config(cfg)
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        if group.rank != 0:
            from model.stream.avatar import AvatarModels

            follow(AvatarModels.load(cfg), cfg, group)
            return 0
        from server.app import serve

        try:
            return serve(cfg)
        finally:
            release_followers(group)
    finally:
        group.shutdown()


if __name__ == "__main__":
    sys.exit(main())
