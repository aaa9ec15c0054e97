"""The aiohttp application: the page at `/`, its files under `/static/`, `/ws` and `POST /offer`; `serve()`."""
from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import sys
from pathlib import Path

import numpy as np
from aiohttp import web

from model.config import AppConfig
from model.weights.hub import WeightsNotFound
from server.access import access_middleware, resolve_token
from server.health import healthz_handler, metrics_handler, page_config_handler
from server.limits import limits_middleware
from server.reference_image import ReferenceImageError, reference_or_drawn
from server.seam import ClipGenerator
from server.sessions import add_session_routes
from server.signaling import STATE_KEY, ServerState, offer_handler, websocket_handler

log = logging.getLogger(__name__)

CLIENT_DIR = Path(__file__).resolve().parent.parent / "client_web"


async def index_handler(request: web.Request) -> web.FileResponse:
    return web.FileResponse(CLIENT_DIR / "index.html", headers={"Cache-Control": "no-cache"})


def build_app(cfg: AppConfig, engine: ClipGenerator, default_reference: np.ndarray) -> web.Application:
    """Routes and shared state; the engine must already be loaded."""
    state = ServerState(cfg=cfg, engine=engine, default_reference=default_reference)
    app = web.Application(client_max_size=cfg.server.max_message_bytes,
                          middlewares=[access_middleware(cfg, state.metrics.error),
                                       limits_middleware(cfg, state.metrics.error)])
    app[STATE_KEY] = state
    _watch_engine(state)
    app.router.add_get("/", index_handler)
    # add_static resolves every path inside CLIENT_DIR and refuses `..` and symlinks out of it
    app.router.add_static("/static/", CLIENT_DIR, follow_symlinks=False, show_index=False)
    app.router.add_get("/ws", websocket_handler)
    app.router.add_post("/offer", offer_handler)
    app.router.add_get("/config.json", page_config_handler)
    app.router.add_get("/healthz", healthz_handler)
    app.router.add_get("/metrics", metrics_handler)
    add_session_routes(app)  # /sessions (API, speak, interrupt, recording, WHEP) and /whip

    async def close_sessions(app: web.Application) -> None:
        await app[STATE_KEY].close_all()

    app.on_shutdown.append(close_sessions)
    if cfg.server.virtualcam:
        from server.virtualcam import add_virtualcam

        add_virtualcam(app)  # the first session on this machine's virtual camera and microphone
    return app


def _watch_engine(state: ServerState) -> None:
    """Gauges read the engine at scrape time; the engine reports clips, drops and worker deaths."""
    engine = state.engine
    state.metrics.watch(sessions=lambda: len(state.sessions),
                        queue_depth=lambda: getattr(engine, "queue_depth", 0),
                        worker_alive=lambda: float(getattr(engine, "worker_alive", True)),
                        model_loaded=lambda: float(getattr(engine, "model_loaded", True)))
    if hasattr(engine, "add_loss_listener"):
        engine.metrics = state.metrics
        engine.add_loss_listener(state.session_lost)


def default_reference(cfg: AppConfig) -> np.ndarray:
    """The avatar shown unless the page sends its own: `--reference` or a drawn face."""
    return reference_or_drawn(cfg.server.reference)


def _ssl_context(cfg: AppConfig) -> ssl.SSLContext | None:
    if not cfg.server.cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cfg.server.cert, cfg.server.key)
    return context


async def run_until_stopped(cfg: AppConfig, reference: np.ndarray) -> None:
    """Load the model, serve until SIGINT/SIGTERM, then close sessions and the engine."""
    from server.engine import ModelEngine

    engine = ModelEngine(cfg)
    print(f"loading the {cfg.model.preset} model ...", flush=True)
    await engine.load()
    runner = web.AppRunner(build_app(cfg, engine, reference), access_log=None)
    await runner.setup()
    context = _ssl_context(cfg)
    site = web.TCPSite(runner, cfg.server.host, cfg.server.port, ssl_context=context)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else cfg.server.port
    scheme = "https" if context else "http"
    print(f"open {scheme}://{cfg.server.host}:{port}/  (kiosk: {scheme}://{cfg.server.host}:{port}/?kiosk=1)",
          flush=True)
    if resolve_token(cfg):
        print("this server needs its token: add ?token=YOUR_TOKEN to the URL (&kiosk=1 for kiosk mode)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        print("stopping ...", flush=True)
        await runner.cleanup()
        await engine.close()


def serve(cfg: AppConfig) -> int:
    """Entry point of `run_server.py serve`; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aioice").setLevel(logging.WARNING)
    try:
        reference = default_reference(cfg)
    except ReferenceImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_stopped(cfg, reference))
    except WeightsNotFound as exc:  # a FileNotFoundError from loading the model, not from the socket
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot listen on {cfg.server.host}:{cfg.server.port}: {exc}", file=sys.stderr)
        return 1
    return 0
