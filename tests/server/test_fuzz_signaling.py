"""Fuzzing the signaling messages (hypothesis): raw text, arbitrary JSON, message-shaped objects and mutated
real SDP offers go through a real `/ws` to a server running the real tiny model. Every message gets
exactly one answer (an error with a known code and a message, an answer, or `stopped`), never an
internal error, and the connection and the server stay healthy."""
from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.reliability_support import (
    JsonSocket,
    offer_sdp,
    running_server,
    server_state,
    settle_and_count,
    small_cfg,
)

pytestmark = pytest.mark.timeout(600)

KNOWN_ERROR_CODES = {"bad_json", "bad_message", "unknown_type", "bad_offer", "bad_config", "bad_sample_steps",
                     "bad_reference_image", "no_session", "session_exists", "too_large", "busy"}
SENTINEL = json.dumps({"type": "fuzz-sentinel"})

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12)

shaped_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["offer", "set", "stop", "answer", "", "OFFER", "stats", "error"]) | st.text(max_size=8)},
    optional={
        "sdp": st.text(max_size=300) | json_values,
        "sample_steps": json_values | st.integers(-5, 20),
        "config": json_values | st.fixed_dictionaries({}, optional={
            "sample_steps": json_values | st.integers(-5, 20), "prompt": json_values,
            "reference_image": st.text(max_size=60) | st.just("data:image/png;base64,") | json_values}),
    })


def mutated_offers(sdp_lines: list[str]) -> st.SearchStrategy[str]:
    """A real offer with lines dropped, repeated, cut short or replaced by junk."""
    def mutate(draw_ops) -> str:
        lines = list(sdp_lines)
        for op, index, junk in draw_ops:
            if not lines:
                break
            i = index % len(lines)
            if op == "drop":
                del lines[i]
            elif op == "repeat":
                lines.insert(i, lines[i])
            elif op == "cut":
                lines[i] = lines[i][: len(lines[i]) // 2]
            else:
                lines[i] = junk
        return "\r\n".join(lines) + "\r\n"

    ops = st.lists(st.tuples(st.sampled_from(["drop", "repeat", "cut", "junk"]), st.integers(0, 10_000),
                             st.text(max_size=40)), min_size=1, max_size=4)
    return ops.map(mutate).map(lambda sdp: json.dumps({"type": "offer", "sdp": sdp}))


def test_fuzzed_signaling_messages_each_get_one_clear_answer():
    loop = asyncio.new_event_loop()
    cfg = small_cfg(**{"server.max_messages_per_s": 100_000, "server.max_sessions": 1})
    tried = {"messages": 0, "answers": 0}

    async def setup():
        context = running_server(cfg)
        server, engine = await context.__aenter__()
        pc, sdp = await offer_sdp()
        await pc.close()
        ws = await JsonSocket.connect(server.ws_url)
        return context, server, engine, sdp, ws

    context, _server, engine, good_sdp, ws = loop.run_until_complete(setup())

    async def exchange(text: str) -> None:
        await ws.send(text)
        await ws.send(SENTINEL)
        reply = await ws.receive(timeout_s=30)
        tried["messages"] += 1
        assert reply["type"] in ("error", "answer", "stopped"), reply
        if reply["type"] == "error":
            assert reply["code"] in KNOWN_ERROR_CODES, (text[:300], reply)
            assert isinstance(reply["message"], str) and len(reply["message"]) > 10
        sentinel = await ws.receive(timeout_s=30)
        assert sentinel["code"] == "unknown_type" and "fuzz-sentinel" in sentinel["message"], \
            ("a message got more than one answer", text[:300], sentinel)
        if reply["type"] == "answer":
            tried["answers"] += 1
            assert (await ws.request({"type": "stop"}))["type"] == "stopped"
        assert engine.worker_alive

    messages = st.one_of(st.text(max_size=300), json_values.map(json.dumps), shaped_messages.map(json.dumps),
                         mutated_offers(good_sdp.splitlines()))

    @settings(max_examples=250, deadline=20_000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(messages)
    def check(text: str) -> None:
        loop.run_until_complete(exchange(text))

    try:
        before = loop.run_until_complete(settle_and_count())
        check()
        after = loop.run_until_complete(settle_and_count(2.0))
        print(f"\nfuzz: {tried['messages']} messages, {tried['answers']} accepted offers; before: {before}; "
              f"after: {after}")
        assert tried["messages"] >= 250
        assert after.fds <= before.fds + 2 and after.tasks <= before.tasks, (before, after)
        # still healthy: a plain offer gets its session
        reply = loop.run_until_complete(ws.request({"type": "offer", "sdp": good_sdp}))
        assert reply["type"] == "answer", reply
    finally:
        loop.run_until_complete(ws.close())
        loop.run_until_complete(asyncio.sleep(0.5))  # the last session's close finishes before the loop ends
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


def test_fuzzed_http_offers_get_json_answers():
    """POST /offer with arbitrary bodies: a JSON error naming the problem (or an answer), never a crash."""
    loop = asyncio.new_event_loop()
    cfg = small_cfg(**{"server.max_messages_per_s": 100_000, "server.max_sessions": 1})
    context = running_server(cfg)
    server, engine = loop.run_until_complete(context.__aenter__())
    http = loop.run_until_complete(_client_session())
    good_sdp = loop.run_until_complete(_offer_text())
    statuses: dict[int, int] = {}

    async def post(body: bytes) -> None:
        async with http.post(server.url + "/offer", data=body,
                             headers={"Content-Type": "application/json"}) as response:
            reply = await response.json()
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if response.status == 200:
            assert reply["type"] == "answer" and "a=fingerprint" in reply["sdp"]
        else:
            assert response.status in (400, 413, 503), (response.status, reply)
            assert reply["type"] == "error" and reply["code"] in KNOWN_ERROR_CODES, reply
        for session in list(server_state(server).sessions):
            await session.close()  # answered offers never connect; free the slot for the next example

    bodies = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                       json_values.map(lambda v: json.dumps(v).encode()),
                       shaped_messages.map(lambda v: json.dumps(v).encode()),
                       mutated_offers(good_sdp.splitlines()).map(str.encode))

    @settings(max_examples=150, deadline=20_000, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(bodies)
    def check(body: bytes) -> None:
        loop.run_until_complete(post(body))

    try:
        check()
        print(f"\nHTTP fuzz: statuses {statuses}")
        assert sum(statuses.values()) >= 150 and engine.worker_alive
    finally:
        loop.run_until_complete(http.close())
        loop.run_until_complete(context.__aexit__(None, None, None))
        loop.close()


async def _client_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession()  # made inside the loop it will run on


async def _offer_text() -> str:
    pc, sdp = await offer_sdp()
    await pc.close()
    return sdp
