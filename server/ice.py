"""STUN/TURN servers from `server.ice_servers`, in the shapes the browser and aiortc each take.

Entries are URLs; a TURN entry carries its credentials as `turn:USER:PASS@host:port`.
"""
from __future__ import annotations

from aiortc import RTCConfiguration, RTCIceServer

from model.config import AppConfig


def ice_server_entry(url: str) -> dict[str, str]:
    """One config entry -> an RTCIceServer dict (`urls`, and `username`/`credential` for TURN)."""
    scheme, _, rest = url.strip().partition(":")
    if scheme in ("turn", "turns") and "@" in rest:
        credentials, _, host = rest.rpartition("@")
        username, _, password = credentials.partition(":")
        return {"urls": f"{scheme}:{host}", "username": username, "credential": password}
    return {"urls": url.strip()}


def browser_ice_servers(cfg: AppConfig) -> list[dict[str, str]]:
    """What the page passes to `new RTCPeerConnection({iceServers})`."""
    return [ice_server_entry(url) for url in cfg.server.ice_servers]


def server_ice_configuration(cfg: AppConfig) -> RTCConfiguration:
    """The same servers for the server's own RTCPeerConnection (none by default: host candidates on a LAN)."""
    return RTCConfiguration(iceServers=[RTCIceServer(**entry) for entry in browser_ice_servers(cfg)])
