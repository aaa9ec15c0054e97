"""`/healthz`, `/metrics` and `/config.json`: what probes, scrapers and the page ask the server about itself."""
from __future__ import annotations

from aiohttp import web

from server.ice import browser_ice_servers
from server.signaling import STATE_KEY


def health_report(state) -> tuple[bool, dict]:
    """(healthy, details): healthy means the model is loaded and its worker runs."""
    engine = state.engine
    model_loaded = bool(getattr(engine, "model_loaded", True))
    worker_alive = bool(getattr(engine, "worker_alive", True))
    report = {
        "status": "ok" if model_loaded and worker_alive else "unavailable",
        "model_loaded": model_loaded,
        "worker_alive": worker_alive,
        "worker_restarts": int(getattr(engine, "worker_restarts", 0)),
        "sessions": len(state.sessions),
        "max_sessions": state.cfg.server.max_sessions,
        "queue_depth": int(getattr(engine, "queue_depth", 0)),
    }
    return model_loaded and worker_alive, report


async def healthz_handler(request: web.Request) -> web.Response:
    """200 with details when the server can take sessions, 503 (same details) when it cannot."""
    healthy, report = health_report(request.app[STATE_KEY])
    return web.json_response(report, status=200 if healthy else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    body, content_type = request.app[STATE_KEY].metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


async def page_config_handler(request: web.Request) -> web.Response:
    """What the page needs before it builds its RTCPeerConnection: the STUN/TURN servers."""
    state = request.app[STATE_KEY]
    return web.json_response({
        "iceServers": browser_ice_servers(state.cfg),
        "sample_steps": state.cfg.sampler.sample_steps,
    }, headers={"Cache-Control": "no-store"})

