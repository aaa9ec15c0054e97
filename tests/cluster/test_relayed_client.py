"""A replica's API port counts a request under the page's address only when the front's secret comes with it:
anyone else on the cluster's network cannot spend another client's per-client allowance or dodge its own."""
from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cluster.replica import RELAY_CLIENT_HEADER, RELAY_SECRET_HEADER, relayed_client_middleware


async def remote_handler(request: web.Request) -> web.Response:
    return web.json_response({"remote": request.remote})


async def test_the_forwarded_address_is_taken_only_with_the_secret():
    app = web.Application(middlewares=[relayed_client_middleware("s3cret")])
    app.router.add_get("/who", remote_handler)
    async with TestClient(TestServer(app)) as client:
        async def remote(headers: dict) -> str:
            async with client.get("/who", headers=headers) as response:
                return (await response.json())["remote"]

        assert await remote({RELAY_CLIENT_HEADER: "203.0.113.7", RELAY_SECRET_HEADER: "s3cret"}) == "203.0.113.7"
        assert await remote({RELAY_CLIENT_HEADER: "203.0.113.7", RELAY_SECRET_HEADER: "guess"}) == "127.0.0.1"
        assert await remote({RELAY_CLIENT_HEADER: "203.0.113.7"}) == "127.0.0.1"


async def test_without_a_secret_no_forwarded_address_is_trusted():
    app = web.Application(middlewares=[relayed_client_middleware(None)])
    app.router.add_get("/who", remote_handler)
    async with TestClient(TestServer(app)) as client, client.get(
            "/who", headers={RELAY_CLIENT_HEADER: "203.0.113.7", RELAY_SECRET_HEADER: ""}) as response:
        assert (await response.json())["remote"] == "127.0.0.1"
