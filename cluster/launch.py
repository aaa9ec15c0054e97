"""`run_server.py cluster`: start or join a Ray cluster and deploy the front and N avatar replicas on it, or
(`--address none`) run the front and one replica in this process without Ray.

    run_server.py cluster --replicas 2                       # a local Ray cluster on this machine
    run_server.py cluster --replicas 8 --address auto        # join the cluster of `ray start` on this node
    run_server.py cluster --replicas 8 --address ray://head:10001 --gpus_per_replica 1
    run_server.py cluster --replicas 4 --address auto --gpus_per_replica 2 --parallel.mode tpp ...  # 2-GPU groups
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import sys
from pathlib import Path

from model.config import AppConfig

ROOT = Path(__file__).resolve().parent.parent
RAY_PIN = "ray[serve]==2.60.0"
INSTALL_HINT = (f"error: `run_server.py cluster` needs Ray Serve, which is not installed: pip install '{RAY_PIN}' "
                "(`make setup` installs it), or add --address none to run one replica in this process")
# what a joined cluster's nodes do not need from this checkout (the code travels as Ray's working_dir)
WORKING_DIR_EXCLUDES = [".venv/", ".git/", "artifacts/", "recordings/", "**/__pycache__/", ".pytest_cache/"]


def add_cluster_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--replicas", type=int, default=1, help="avatar replicas (one GPU group each)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join: 'auto' (the `ray start` cluster of this node), ray://HEAD:10001, "
                             "or 'none' (no Ray: the front and one replica in this process); default: start a "
                             "local Ray cluster")
    parser.add_argument("--gpus_per_replica", type=float, default=0.0,
                        help="GPUs Ray reserves for each replica: 0 with the CPU preset, 1 for the 14B preset, G for "
                             "a group of G GPUs (Ulysses or tpp, as torchrun --nproc-per-node G), below 1 to share one")
    parser.add_argument("--ranks_per_replica", type=int, default=None,
                        help="processes in each replica's group (default: --gpus_per_replica, at least 1); on the CPU "
                             "a gloo group rehearses a GPU group's code path")
    parser.add_argument("--cpus_per_replica", type=float, default=1.0, help="CPUs Ray reserves for each replica")


def ranks_per_replica(args: argparse.Namespace) -> int:
    if args.ranks_per_replica is not None:
        return args.ranks_per_replica
    return max(1, int(args.gpus_per_replica))


def check_cluster_flags(args: argparse.Namespace, cfg: AppConfig) -> str | None:
    """The refusal for flags that cannot work, naming the flag; None when they can."""
    if args.replicas < 1:
        return f"--replicas must be >= 1, got {args.replicas}"
    if args.gpus_per_replica < 0 or args.cpus_per_replica < 0:
        return "--gpus_per_replica and --cpus_per_replica must be >= 0"
    ranks = ranks_per_replica(args)
    if ranks < 1:
        return f"--ranks_per_replica must be >= 1, got {ranks}"
    if cfg.runtime.device.startswith("cuda") and args.address != "none":
        if args.gpus_per_replica <= 0:
            return "the config runs on CUDA (runtime.device): give each replica its GPU with --gpus_per_replica 1"
        if (args.gpus_per_replica >= 1 or ranks > 1) and args.gpus_per_replica != ranks:
            return (f"--ranks_per_replica {ranks} with --gpus_per_replica {args.gpus_per_replica:g}: each rank of a "
                    "replica's group drives one GPU, so they must be equal (a fraction of a GPU: one rank)")
    if args.address == "none" and args.replicas != 1:
        return "--address none runs one replica in this process; use Ray (--address auto/ray://...) for more"
    return None


def cluster_config(cfg: AppConfig) -> AppConfig:
    """The config the deployments get: what this shell's environment adds is resolved here, since the front and
    replicas run in Ray's processes, which do not see it (a `$LIVEAVATAR_TOKEN` left behind would open the front)."""
    from server.access import resolve_token

    return dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, token=resolve_token(cfg)))


def run_cluster(cfg: AppConfig, args: argparse.Namespace) -> int:
    """Entry point of `run_server.py cluster`; returns the process exit code."""
    refusal = check_cluster_flags(args, cfg)
    if refusal:
        print(f"error: {refusal}", file=sys.stderr)
        return 2
    if args.address == "none":
        return _run_in_process(cfg, ranks_per_replica(args))
    try:
        import ray
        from ray import serve
    except ImportError:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from cluster.serve_app import APP_NAME, deploy

    joined = args.address is not None
    # joining: the code travels to every node as the job's working_dir; a local cluster imports it from here
    runtime_env = {"working_dir": str(ROOT), "excludes": WORKING_DIR_EXCLUDES} if joined else \
        {"env_vars": {"PYTHONPATH": str(ROOT)}}
    ray.init(address=args.address, runtime_env=runtime_env, include_dashboard=False if not joined else None)
    try:
        url = deploy(cluster_config(cfg), args.replicas, args.gpus_per_replica, args.cpus_per_replica, ranks_per_replica(args))
        print(f"{args.replicas} avatar replica(s) up; open {url}  (kiosk: {url}?kiosk=1)", flush=True)
        _wait_for_signal()
    finally:
        print("stopping ...", flush=True)
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return 0


def _wait_for_signal() -> None:
    stop = {"now": False}

    def handler(signum: int, frame: object) -> None:
        stop["now"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not stop["now"]:
        signal.pause()


def _run_in_process(cfg: AppConfig, ranks: int) -> int:
    """The front and one `AvatarReplica` in this process: the cluster's code path without Ray."""
    import logging
    import secrets

    from server.app import _ssl_context

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)

    async def serve_until_stopped() -> None:
        from aiohttp import web

        from cluster.front import FrontServer
        from cluster.links import InProcessLink
        from cluster.replica import AvatarReplica

        secret = secrets.token_hex(16)
        replica = AvatarReplica(cfg, ranks, relay_secret=secret)
        print(f"loading the {cfg.model.preset} model ...", flush=True)
        await replica.start()
        front = FrontServer(cfg, [InProcessLink("avatar_0", replica)], secret)
        await front.start()
        runner = web.AppRunner(front.build_app(), access_log=None)
        await runner.setup()
        context = _ssl_context(cfg)
        await web.TCPSite(runner, cfg.server.host, cfg.server.port, ssl_context=context).start()
        port = runner.addresses[0][1]
        print(f"open {'https' if context else 'http'}://{cfg.server.host}:{port}/  (one replica, no Ray)", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            print("stopping ...", flush=True)
            await runner.cleanup()
            await replica.close()

    try:
        asyncio.run(serve_until_stopped())
    except OSError as exc:
        print(f"error: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc}", file=sys.stderr)
        return 1
    return 0
