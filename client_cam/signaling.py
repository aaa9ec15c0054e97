"""Talking to the server the way its page does: `GET /config.json` (STUN/TURN servers, and a first check of
the token), then the `/ws` websocket: `offer` -> `queued`* -> `answer`, then `stats` and `error` messages.

Every way this can fail becomes one line: unreachable, token refused, busy, or the server's own message.
"""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiortc import RTCIceServer
from PIL import Image, UnidentifiedImageError

from client_cam.errors import EXIT_USAGE, ClientError, ServerRefused

MAX_REFERENCE_SIDE = 512  # the page scales pictures down the same way, so the offer stays small
RETRYABLE_CODES = ("busy", "connection_lost", "connect_timeout", "worker_failed", "internal_error")


def reference_data_url(path: str | Path) -> str:
    """A reference picture as the page sends it: at most 512 px a side, JPEG, in a data URL."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            image.thumbnail((MAX_REFERENCE_SIDE, MAX_REFERENCE_SIDE))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
    except (OSError, UnidentifiedImageError) as exc:
        raise ClientError(f"--reference {path}: not an image this client can read ({exc})", EXIT_USAGE) from None
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


class ServerLink:
    """The server's address and token, and the HTTP/websocket calls made to it."""

    def __init__(self, url: str, token: str | None) -> None:
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            url = "http://" + url
        self.url = url
        self.ws_url = "ws" + url[len("http"):] + "/ws"
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    def _unreachable(self, exc: BaseException) -> ServerRefused:
        return ServerRefused("unreachable", f"cannot reach the server at {self.url} ({exc}); is run_server.py "
                                            "running there, and are the host and port right?", retry=True)

    def _refusal(self, status: int, body: str) -> ServerRefused:
        try:
            message = json.loads(body)
            code, text = message.get("code", "error"), message.get("message", body)
        except (json.JSONDecodeError, AttributeError):
            code, text = "error", body.strip()[:200]
        if status == 401 or code == "unauthorized":
            hint = "pass --token" if not self._headers else "check --token"
            return ServerRefused("unauthorized", f"the server at {self.url} refused the token: {text} ({hint})",
                                 retry=False)
        return ServerRefused(code, f"the server at {self.url} answered HTTP {status}: {text}", retry=status >= 500)

    async def ice_servers(self, http: aiohttp.ClientSession) -> list[RTCIceServer]:
        """The STUN/TURN servers the page would use (none on a LAN)."""
        try:
            async with http.get(self.url + "/config.json", headers=self._headers) as response:
                body = await response.text()
                if response.status != 200:
                    raise self._refusal(response.status, body)
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None
        try:
            entries = json.loads(body).get("iceServers", [])
            return [RTCIceServer(**entry) for entry in entries]
        except (json.JSONDecodeError, AttributeError, TypeError) as exc:
            raise ServerRefused("bad_answer", f"{self.url}/config.json is not a liveavatar server's ({exc})",
                                retry=False) from None

    async def open_socket(self, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
        try:
            return await http.ws_connect(self.ws_url, headers=self._headers, heartbeat=20.0, max_msg_size=2**22)
        except aiohttp.WSServerHandshakeError as exc:
            raise self._refusal(exc.status, exc.message) from None
        except aiohttp.ClientError as exc:
            raise self._unreachable(exc) from None


def offer_message(sdp: str, reference: str | None, prompt: str | None, sample_steps: int | None) -> dict[str, Any]:
    """The page's `offer` message, with only the settings given."""
    config: dict[str, Any] = {}
    if reference is not None:
        config["reference_image"] = reference
    if prompt is not None:
        config["prompt"] = prompt
    if sample_steps is not None:
        config["sample_steps"] = sample_steps
    return {"type": "offer", "sdp": sdp, "config": config}


def refusal_from_error(message: dict[str, Any]) -> ServerRefused:
    """A server `error` message as a refusal (busy, a bad setting, the session lost, ...)."""
    code = str(message.get("code", "error"))
    text = str(message.get("message", ""))
    if code == "busy" and "busy" not in text:
        text = f"the server is busy: {text}"
    elif code in ("bad_config", "bad_reference_image", "bad_sample_steps", "bad_offer"):
        return ServerRefused(code, f"the server refused the settings: {text}", retry=False)
    return ServerRefused(code, text or code, retry=code in RETRYABLE_CODES)
