"""Access: loopback by default, bearer token on /ws, /offer, /config.json and /metrics (also from the page's
?token=), websocket Origin check, HTTPS/WSS with --cert/--key, STUN/TURN from config, no path traversal."""
from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from pathlib import Path

import aiohttp
import pytest
import websockets
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from playwright.async_api import async_playwright
from yarl import URL

import run_server
from model.config import ConfigError, load_config
from server.app import _ssl_context, build_app
from server.reference_image import drawn_reference
from server.session import Session
from tests.server.reliability_support import JsonSocket, running_server, server_state, small_cfg
from tests.server.test_browser_page import CHROMIUM, chromium_args, wait_for

pytestmark = pytest.mark.timeout(180)

TOKEN = "k3y-for-tests"


def test_server_binds_to_loopback_unless_told_otherwise():
    assert load_config(None).server.host == "127.0.0.1"
    assert load_config("configs/liveavatar_14b.yaml").server.host == "127.0.0.1"
    _, _, cfg = run_server.parse_args([])
    assert cfg.server.host == "127.0.0.1" and cfg.server.token is None
    _, _, cfg = run_server.parse_args(["--token", "abc", "--cert", "c.pem", "--key", "k.pem"])
    assert (cfg.server.token, cfg.server.cert, cfg.server.key) == ("abc", "c.pem", "k.pem")
    with pytest.raises(ConfigError, match="both --cert and --key"):
        run_server.parse_args(["--cert", "c.pem"])


async def get(url: str, **kwargs) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url, **kwargs) as response:
        return response.status, await response.text()


async def test_token_guards_ws_offer_config_and_metrics_but_not_the_page(monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    async with running_server(small_cfg(**{"server.token": TOKEN})) as (server, _):
        for path in ("/config.json", "/metrics"):
            status, body = await get(server.url + path)
            assert status == 401 and json.loads(body)["code"] == "unauthorized" and "?token=" in body
            status, body = await get(server.url + path + "?token=wrong")
            assert status == 401 and "does not match" in body
            assert (await get(server.url + path + f"?token={TOKEN}"))[0] == 200
            assert (await get(server.url + path, headers={"Authorization": f"Bearer {TOKEN}"}))[0] == 200
        assert (await get(server.url + "/"))[0] == 200
        assert (await get(server.url + "/healthz"))[0] == 200
        async with aiohttp.ClientSession() as http, \
                http.post(server.url + "/offer", json={"type": "offer", "sdp": "v=0"}) as response:
            assert response.status == 401 and (await response.json())["code"] == "unauthorized"
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(server.ws_url)
        assert refused.value.response.status_code == 401
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(server.ws_url + "?token=nope")
        ws = await JsonSocket.connect(server.ws_url + f"?token={TOKEN}")
        assert (await ws.request("{"))["code"] == "bad_json"  # in, and served
        await ws.close()
        ws = await JsonSocket.connect(server.ws_url, additional_headers={"Authorization": f"Bearer {TOKEN}"})
        assert (await ws.request("{"))["code"] == "bad_json"
        await ws.close()


async def test_token_from_the_environment(monkeypatch):
    monkeypatch.setenv("LIVEAVATAR_TOKEN", "from-env")
    async with running_server(small_cfg()) as (server, _):
        assert (await get(server.url + "/config.json"))[0] == 401
        assert (await get(server.url + "/config.json?token=from-env"))[0] == 200


async def test_websocket_origin_must_be_the_page_or_an_allowed_one(monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    async with running_server(small_cfg()) as (server, engine):
        ws = await JsonSocket.connect(server.ws_url, origin=server.url)  # the page's own origin
        assert (await ws.request("{"))["code"] == "bad_json"
        await ws.close()
        for origin in ("http://evil.example", "http://127.0.0.1:1", "null", "file://"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                await websockets.connect(server.ws_url, origin=origin)
            assert refused.value.response.status_code == 403
            assert b"forbidden_origin" in refused.value.response.body
        cfg = small_cfg(**{"server.allowed_origins": "https://kiosk.example"})
        async with running_server(cfg, engine) as (other, _):
            ws = await JsonSocket.connect(other.ws_url, origin="https://kiosk.example")
            assert (await ws.request("{"))["code"] == "bad_json"
            await ws.close()
            with pytest.raises(websockets.InvalidStatus):
                await websockets.connect(other.ws_url, origin="http://evil.example")


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


async def test_https_and_wss_with_cert_and_key(tmp_path, monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    cert, key = self_signed_cert(tmp_path)
    cfg = small_cfg(**{"server.cert": str(cert), "server.key": str(key), "server.token": TOKEN})
    async with running_server(cfg) as (_plain, engine):
        runner = web.AppRunner(build_app(cfg, engine, drawn_reference()), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=_ssl_context(cfg))
        await site.start()
        port = runner.addresses[0][1]
        client_ssl = ssl.create_default_context(cafile=str(cert))
        try:
            status, body = await get(f"https://127.0.0.1:{port}/healthz", ssl=client_ssl)
            assert status == 200 and json.loads(body)["status"] == "ok"
            ws = JsonSocket(await websockets.connect(f"wss://127.0.0.1:{port}/ws?token={TOKEN}", ssl=client_ssl,
                                                     origin=f"https://127.0.0.1:{port}"))
            assert (await ws.request('{"type":"hello"}'))["code"] == "unknown_type"
            await ws.close()
            with pytest.raises(websockets.InvalidStatus):  # an http:// page may not use the https server
                await websockets.connect(f"wss://127.0.0.1:{port}/ws?token={TOKEN}", ssl=client_ssl,
                                         origin=f"http://127.0.0.1:{port}")
            with pytest.raises(ssl.SSLError):  # nothing in clear text on the TLS port
                await get(f"https://127.0.0.1:{port}/healthz", ssl=ssl.create_default_context())
        finally:
            await runner.cleanup()


TRAVERSALS = [
    "/static/../model/config.py", "/static/..%2fmodel%2fconfig.py", "/static/%2e%2e/model/config.py",
    "/static/%2e%2e%2fmodel%2fconfig.py", "/static/..%252fmodel%252fconfig.py", "/static/..%5cmodel%5cconfig.py",
    "/static/....//model/config.py", "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/static/..%2f..%2f..%2f..%2fetc%2fpasswd", "/static//etc/passwd", "/static/%2fetc%2fpasswd",
    "/static/..%c0%afmodel/config.py", "/static/.%2e/model/config.py", "/%2e%2e/model/config.py",
    "/static/app.js/../../model/config.py", "/static/%00../model/config.py",
]


async def test_static_files_cannot_escape_the_page_folder(monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    async with running_server(small_cfg()) as (server, _):
        status, body = await get(server.url + "/static/app.js")
        assert status == 200 and "RTCPeerConnection" in body  # the folder itself is served
        async with aiohttp.ClientSession() as http:
            for path in TRAVERSALS:
                async with http.get(URL(server.url + path, encoded=True), allow_redirects=False) as response:
                    body = await response.text(errors="replace")
                    assert response.status in (400, 403, 404), (path, response.status)
                    assert "class ServerConfig" not in body and "root:" not in body, path


async def test_stun_and_turn_servers_from_config_reach_the_page_and_the_server_peer_connection(monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    cfg = small_cfg(**{"server.ice_servers": "stun:stun.example.org:3478,turn:alice:s3cret@turn.example.org:3478"})
    expected = [{"urls": "stun:stun.example.org:3478"},
                {"urls": "turn:turn.example.org:3478", "username": "alice", "credential": "s3cret"}]
    async with running_server(cfg) as (server, engine):
        status, body = await get(server.url + "/config.json")
        assert status == 200 and json.loads(body)["iceServers"] == expected
        session = Session(cfg, engine, drawn_reference())
        try:
            servers = session._pc._RTCPeerConnection__configuration.iceServers  # what aioice gathers with
            assert [(s.urls, s.username, s.credential) for s in servers] == \
                [(e["urls"], e.get("username"), e.get("credential")) for e in expected]
        finally:
            await session.close()


async def test_the_page_passes_its_token_to_the_server(speech_wav, tmp_path, monkeypatch):
    monkeypatch.delenv("LIVEAVATAR_TOKEN", raising=False)
    async with running_server(small_cfg(**{"server.token": TOKEN})) as (server, _):
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=chromium_args(speech_wav))
            try:
                page = context.pages[0] if context.pages else await context.new_page()
                await page.goto(server.url + "/")  # no token: the page says what is missing
                await page.click("#start")
                await wait_for(page, "document.getElementById('error').textContent.includes('token')", 20)
                await page.goto(server.url + f"/?token={TOKEN}")
                await page.click("#start")
                await wait_for(page, "window.avatarPage.framesDecoded > 0", timeout_s=60)
                assert len(server_state(server).sessions) == 1
                assert await page.evaluate("document.getElementById('error').textContent") == ""
            finally:
                await context.close()
        await asyncio.sleep(0.5)
