"""A worker's routing to the engine replicas: the async shell around ``routing.Router``.

``EngineRoutes`` refreshes the replicas' states from their actors every ``REFRESH_S``
and hands out a replica per request (``lease``), waiting while every ready replica is at
this worker's share of its cap, or none is ready yet (the job starts when the first one
is; the others join at the next refresh). ``RoutedClient`` is ``ApiClient`` with the URL
chosen per attempt: a RowRunner uses it unchanged, so retries, budgets and results work
as with an endpoint. An attempt that fails the way a dead server fails (refused, reset,
timed out) benches the replica (``Router.suspect``); the row's retry goes elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from batchrun.api.client import ApiClient
from batchrun.api.protocols import Completion, Provider, RequestKind
from batchrun.engine.routing import ReplicaView, Router, share_of_cap
from batchrun.errors import RequestError, RetryableError
from batchrun.spec import JobSpec

__all__ = ["REFRESH_S", "EngineRoutes", "RoutedClient", "engine_client"]

REFRESH_S = 0.5
STATE_TIMEOUT_S = 10.0
_DEAD_SERVER = {"connect_refused", "connection", "timeout"}


class EngineRoutes:
    def __init__(self, replicas: list[Any], router: Router):
        self._replicas = replicas
        self.router = router
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def _refresh_once(self) -> None:
        async def one(i: int, a: Any) -> ReplicaView:
            try:
                s = await asyncio.wait_for(a.state.remote(), STATE_TIMEOUT_S)
            except Exception:  # an actor Ray is restarting (or slow): not routable now
                return ReplicaView(i, "restarting")
            return ReplicaView(s["index"], s["state"], s["url"], s["node_id"], s["generation"],
                               s["error"])

        views = await asyncio.gather(*(one(i, a) for i, a in enumerate(self._replicas)))
        self.router.update(list(views))
        async with self._changed:
            self._changed.notify_all()

    async def _refresh(self) -> None:
        while True:
            await self._refresh_once()
            await asyncio.sleep(REFRESH_S)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._refresh())

    @contextlib.asynccontextmanager
    async def lease(self) -> AsyncIterator[ReplicaView]:
        self.start()
        async with self._changed:
            while (view := self.router.acquire(time.monotonic())) is None:
                if self.router.all_failed():  # the driver halts the job (Fleet.watch)
                    raise RetryableError("every engine replica failed",
                                         error_type="connect_refused")
                await self._changed.wait()
        try:
            yield view
        finally:
            self.router.release(view.index)
            async with self._changed:
                self._changed.notify_all()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()


class RoutedClient(ApiClient):
    """``ApiClient`` whose every attempt goes to the replica ``routes`` picks."""

    def __init__(self, *args: Any, routes: EngineRoutes, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._routes = routes

    async def complete(self, body: dict[str, Any], base_url: str | None = None) -> Completion:
        async with self._routes.lease() as view:
            assert view.url is not None
            try:
                return await super().complete(body, base_url=view.url)
            except RequestError as e:
                if e.error_type in _DEAD_SERVER:
                    self._routes.router.suspect(view, time.monotonic())
                raise


def _worker_index() -> int:
    """This worker's index, from its actor name ``batchrun:<job>:worker-N``."""
    import ray

    name = ray.get_runtime_context().get_actor_name() or ""
    tail = name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def engine_client(spec: JobSpec, session: aiohttp.ClientSession, key: str | None,
                  kind: RequestKind, provider: Provider) -> RoutedClient:
    """The worker's client for an ``engine:`` job: its share of each replica's cap,
    preferring replicas on its own node."""
    import ray

    from batchrun.engine.fleet import replica_handles

    assert spec.engine is not None
    e = spec.engine
    share = share_of_cap(e.max_concurrency_per_replica, spec.workers, _worker_index())
    router = Router(share, ray.get_runtime_context().get_node_id())
    routes = EngineRoutes(replica_handles(spec.name, e.replicas), router)
    return RoutedClient(session, spec.endpoint, key, kind, provider, routes=routes)
