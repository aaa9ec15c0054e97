"""Who may use the server: an optional bearer token on the control endpoints and a websocket Origin check.

The page itself (`/`, `/static/`) and `/healthz` stay open so a browser can load the page and a load
balancer can probe; everything that starts a session or reveals its settings needs the token.
"""
from __future__ import annotations

import hmac
import os
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from model.config import AppConfig

TOKEN_ENV_VAR = "LIVEAVATAR_TOKEN"
PROTECTED_PATHS = ("/ws", "/offer", "/config.json", "/metrics")
PROTECTED_PREFIXES = ("/sessions", "/whip")  # the sessions API, WHEP viewers, WHIP ingest

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def resolve_token(cfg: AppConfig) -> str | None:
    """The token the server demands: `--token`, else $LIVEAVATAR_TOKEN, else none (open server)."""
    token = (cfg.server.token or os.environ.get(TOKEN_ENV_VAR) or "").strip()
    return token or None


def presented_token(request: web.Request) -> str | None:
    """`Authorization: Bearer T` from scripts, or `?token=T` from the page (browsers cannot set ws headers)."""
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.query.get("token") or None


def token_matches(expected: str, presented: str | None) -> bool:
    """Constant-time comparison, so response timing does not leak how much of a guess was right."""
    return presented is not None and hmac.compare_digest(expected.encode(), presented.encode())


def origin_allowed(request: web.Request, allowed_origins: tuple[str, ...]) -> bool:
    """Browsers always send Origin on websockets; refuse other sites' pages (cross-site websocket hijacking).

    No Origin at all means a non-browser client (scripts, aiortc), which the token guards instead.
    With no `allowed_origins` configured only the page's own origin (same host and port) is accepted.
    """
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if allowed_origins:
        return "*" in allowed_origins or origin in {o.strip().rstrip("/").lower() for o in allowed_origins}
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False
    expected_scheme = "https" if request.secure else "http"
    return parts.scheme == expected_scheme and parts.netloc == request.host.lower()


def access_error(status: int, code: str, message: str) -> web.Response:
    """A refusal in the same JSON shape as every other error the server sends."""
    return web.json_response({"type": "error", "code": code, "message": message}, status=status)


def access_middleware(cfg: AppConfig, on_refused: Callable[[str], None] | None = None) -> web.middleware:
    """aiohttp middleware: token on PROTECTED_PATHS, Origin on `/ws`; refusals are JSON errors saying why."""
    token = resolve_token(cfg)
    allowed_origins = tuple(cfg.server.allowed_origins)

    @web.middleware
    async def check_access(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path in PROTECTED_PATHS or path.startswith(PROTECTED_PREFIXES):
            if token is not None and not token_matches(token, presented_token(request)):
                if on_refused is not None:
                    on_refused("unauthorized")
                missing = presented_token(request) is None
                return access_error(401, "unauthorized",
                                    "this server needs a token: open the page as /?token=YOUR_TOKEN or send "
                                    "'Authorization: Bearer YOUR_TOKEN'" if missing else
                                    "the token does not match the server's --token / $LIVEAVATAR_TOKEN")
            if path == "/ws" and not origin_allowed(request, allowed_origins):
                if on_refused is not None:
                    on_refused("forbidden_origin")
                return access_error(403, "forbidden_origin",
                                    f"websocket from origin {request.headers.get('Origin')!r} refused; serve the "
                                    "page from this server or add its origin to --server.allowed_origins")
        return await handler(request)

    return check_access
