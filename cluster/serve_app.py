"""The Ray Serve application: N avatar deployments of one replica each, and the front that owns the address.

Each avatar replica is its own deployment (`avatar_0`, `avatar_1`, ...) so the front can address one replica
by name: a page's session, its peer connection and its relayed messages must always reach the same process,
which Serve's own request routing (any replica of a deployment) does not promise. Serve still does what it is
for: places each replica on a node with its GPUs (`ray_actor_options`), health-checks it and starts a new
one when it dies, and keeps the front running.

The front listens on `server.host:server.port` from inside its deployment with the single server's aiohttp
stack (token, origin, limits, TLS) rather than behind Serve's ASGI proxy, which is disabled.
"""
from __future__ import annotations

import logging
import secrets
from typing import Any

import ray
from aiohttp import web
from ray import serve
from ray.exceptions import RayError
from ray.serve.handle import DeploymentHandle

from cluster.front import FrontServer
from cluster.links import CONTROL_TIMEOUT_S, OFFER_TIMEOUT_S, POLL_SLACK_S, ReplicaGone, within
from cluster.replica import AvatarReplica
from model.config import AppConfig
from server.app import _ssl_context

log = logging.getLogger(__name__)

APP_NAME = "liveavatar"
FRONT_NAME = "front"
MAX_ONGOING_REQUESTS = 10_000  # every page holds one long poll; Serve's default (5) would queue them
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve notices a dead replica and starts another
HEALTH_CHECK_TIMEOUT_S = 30.0


def replica_name(index: int) -> str:
    return f"avatar_{index}"


class ServeLink:
    """A `ReplicaLink` over a Serve deployment handle; Ray's errors and timeouts become ReplicaGone."""

    def __init__(self, name: str, handle: DeploymentHandle) -> None:
        self.name = name
        self._handle = handle

    async def _call(self, method: str, timeout_s: float, *args: Any) -> Any:
        try:
            return await within(getattr(self._handle, method).remote(*args), timeout_s, method, self.name)
        except RayError as exc:  # the actor died, is unavailable, or the call failed inside it
            raise ReplicaGone(f"{type(exc).__name__}: {_first_line(exc)}") from None

    async def status(self) -> dict[str, Any]:
        return await self._call("status", CONTROL_TIMEOUT_S)

    async def metrics_text(self) -> str:
        return await self._call("metrics_text", CONTROL_TIMEOUT_S)

    async def open_connection(self, client: str) -> str:
        return await self._call("open_connection", CONTROL_TIMEOUT_S, client)

    async def offer(self, connection_id: str, text: str) -> dict[str, Any]:
        return await self._call("offer", OFFER_TIMEOUT_S, connection_id, text)

    async def deliver(self, connection_id: str, text: str) -> dict[str, Any]:
        return await self._call("deliver", CONTROL_TIMEOUT_S, connection_id, text)

    async def poll(self, connection_id: str, wait_s: float) -> dict[str, Any]:
        return await self._call("poll", wait_s + POLL_SLACK_S, connection_id, wait_s)

    async def close_connection(self, connection_id: str) -> None:
        await self._call("close_connection", CONTROL_TIMEOUT_S, connection_id)

    async def http_offer(self, payload: Any, client: str) -> tuple[int, dict[str, Any]]:
        return await self._call("http_offer", OFFER_TIMEOUT_S, payload, client)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no details"


class AvatarDeployment(AvatarReplica):
    """An `AvatarReplica` as Serve runs it: the model loads in the constructor, so Serve counts the replica as
    running (and the front may place sessions on it) only once it can take them."""

    async def __init__(self, cfg: AppConfig, ranks: int = 1,  # type: ignore[misc]  # Serve awaits it
                       relay_secret: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("aioice").setLevel(logging.WARNING)
        # its API port listens on the node's address, where the front (on the head) reaches it
        super().__init__(cfg, ranks, api_host=ray.util.get_node_ip_address(), relay_secret=relay_secret)
        await self.start()

    async def __del__(self) -> None:  # Serve's graceful stop (a killed process just goes; its front notices)
        await self.close()


class FrontDeployment:
    """The front as Serve runs it: its aiohttp site opens in the constructor, on the configured address."""

    async def __init__(self, cfg: AppConfig, replicas: dict[str, DeploymentHandle],  # type: ignore[misc]
                       relay_secret: str | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        links = [ServeLink(name, handle) for name, handle in sorted(replicas.items())]
        self.front = FrontServer(cfg, links, relay_secret)
        await self.front.start()
        self._runner = web.AppRunner(self.front.build_app(), access_log=None)
        await self._runner.setup()
        context = _ssl_context(cfg)
        await web.TCPSite(self._runner, cfg.server.host, cfg.server.port, ssl_context=context).start()
        port = self._runner.addresses[0][1]
        host = cfg.server.host if cfg.server.host not in ("0.0.0.0", "::", "") else ray.util.get_node_ip_address()
        self._url = f"{'https' if context else 'http'}://{host}:{port}/"
        log.info("front listening on %s", self._url)

    def url(self) -> str:
        return self._url

    async def __del__(self) -> None:  # Serve's graceful stop: close the pages' relays, then the site
        await self._runner.cleanup()

    async def check_health(self) -> None:
        """Serve's probe: the site must still be up (the replicas have their own)."""
        if not self._runner.sites:
            raise RuntimeError("the front's HTTP site is down")


def build_application(cfg: AppConfig, replicas: int, gpus_per_replica: float = 0.0,
                      cpus_per_replica: float = 1.0, ranks_per_replica: int = 1,
                      front_on_head: bool = True) -> serve.Application:
    """The bound application: `replicas` avatar deployments (each a group of `ranks_per_replica` processes over
    its `gpus_per_replica` GPUs) and the front bound to their handles."""
    relay_secret = secrets.token_hex(16)  # the replicas' API ports trust forwarded page addresses only with it
    avatars = {}
    for index in range(replicas):
        name = replica_name(index)
        avatars[name] = serve.deployment(
            AvatarDeployment, name=name, num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS,
            health_check_period_s=HEALTH_CHECK_PERIOD_S, health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
            graceful_shutdown_timeout_s=5.0,
            ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica},
        ).bind(cfg, ranks_per_replica, relay_secret)
    front_actor: dict[str, Any] = {"num_cpus": 0}
    if front_on_head:  # the address people open is the head node's
        front_actor["resources"] = {"node:__internal_head__": 0.001}
    return serve.deployment(
        FrontDeployment, name=FRONT_NAME, num_replicas=1, max_ongoing_requests=100,
        health_check_period_s=HEALTH_CHECK_PERIOD_S, ray_actor_options=front_actor,
    ).bind(cfg, avatars, relay_secret)


def deploy(cfg: AppConfig, replicas: int, gpus_per_replica: float = 0.0, cpus_per_replica: float = 1.0,
           ranks_per_replica: int = 1) -> str:
    """Deploy on the connected Ray cluster (ray.init done); returns the front's URL once every replica is up."""
    serve.start(proxy_location="Disabled")
    app = build_application(cfg, replicas, gpus_per_replica, cpus_per_replica, ranks_per_replica)
    handle = serve.run(app, name=APP_NAME, route_prefix=None, logging_config={"enable_access_log": False})
    return handle.url.remote().result()
