"""The driver's side of an engine: reserve, start, wait for the first replica, watch the
GPU-time budget, stop everything.

``Fleet.start`` checks that the replicas fit the cluster (before reserving anything),
creates one placement group (a bundle per replica), starts the replica actors on their
bundles and returns as soon as one replica is ready: the job starts sending then, and
the others join the workers' routing when they are ready. If none becomes ready, the job
fails naming each replica with the tail of its log.

``Fleet.stop`` (the runner's ``finally``) stops every server's process tree, kills the
actors and removes the placement group; the GPU time reported is from the reservation
to that release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from batchrun.engine.plan import (
    GpuUsage,
    check_fits,
    cost_cap_reached,
    engine_name,
    placement_bundles,
)
from batchrun.engine.replica import EngineReplica
from batchrun.errors import ClusterError, UserError
from batchrun.spec import EngineSpec, JobSpec

__all__ = ["BUDGET_CHECK_S", "Fleet", "replica_handles"]

log = logging.getLogger("batchrun")

BUDGET_CHECK_S = 1.0
STOP_AHEAD_S = 15.0  # what stopping takes (SIGTERM grace included): charged in advance
POLL_S = 0.5
STATE_TIMEOUT_S = 10.0


def replica_handles(job: str, replicas: int) -> list[Any]:
    """The replica actors, by name (workers look them up)."""
    return [ray.get_actor(engine_name(job, i)) for i in range(replicas)]


def _actor_options(engine: EngineSpec) -> dict[str, Any]:
    res = dict(engine.resources)
    return {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0),
            "memory": res.pop("memory", None), "resources": res or None}


class Fleet:
    def __init__(self, spec: JobSpec, worker_cpus: float = 0.0):
        assert spec.engine is not None
        self._worker_cpus = worker_cpus
        self._spec, self._engine = spec, spec.engine
        self.replicas: list[Any] = []
        self._pg: Any = None
        self.reserved_at: float | None = None
        self.released_at: float | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None

    def check_fits(self) -> None:
        """Exit 2 before reserving anything when the replicas cannot fit this cluster."""
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        problem = check_fits(self._engine, ray.cluster_resources(), nodes, self._worker_cpus)
        if problem:
            raise UserError(problem)

    def start(self) -> None:
        self.check_fits()
        e = self._engine
        self._pg = placement_group(placement_bundles(e), strategy=e.strategy,
                                   name=f"batchrun:{self._spec.name}:engines")
        self.reserved_at = time.time()
        if not self._pg.wait(timeout_seconds=e.startup_timeout_s):
            raise ClusterError(f"the cluster could not reserve {e.replicas} x {e.resources} "
                               f"({e.strategy}) within {e.startup_timeout_s:g} s; other jobs "
                               "may hold them: `ray status` shows what is in use")
        opts = _actor_options(e)
        for i in range(e.replicas):
            strategy = PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i)
            try:
                actor = EngineReplica.options(  # type: ignore[attr-defined]
                    name=engine_name(self._spec.name, i), scheduling_strategy=strategy,
                    **{k: v for k, v in opts.items() if v is not None}).remote(
                    self._spec.name, i, e, self._spec.model, self._spec.storage)
            except ValueError as err:  # the name is taken: this job runs already
                raise UserError(f"job {self._spec.name!r} is already running on this Ray "
                                "cluster (its engine actors exist); stop it first") from err
            self.replicas.append(actor)
        self._wait_first_ready()

    def states(self, timeout: float = 30.0) -> list[dict[str, Any]]:
        out = []
        for i, a in enumerate(self.replicas):
            try:
                out.append(ray.get(a.state.remote(), timeout=timeout))
            except (ray.exceptions.RayError, TimeoutError) as err:
                out.append({"index": i, "state": "restarting", "error": type(err).__name__})
        return out

    def _wait_first_ready(self) -> None:
        deadline = time.monotonic() + self._engine.startup_timeout_s + 60.0
        while time.monotonic() < deadline:
            states = self.states()
            if any(s["state"] == "ready" for s in states):
                for s in states:
                    if s["state"] == "failed":
                        log.warning("%s", s["error"])
                log.info("engine: %d of %d replicas ready; sending", sum(
                    s["state"] == "ready" for s in states), len(states))
                return
            if all(s["state"] == "failed" for s in states):
                raise ClusterError("no engine replica became ready: " + "; ".join(
                    str(s["error"]) for s in states))
            time.sleep(POLL_S)
        raise ClusterError(f"no engine replica became ready within "
                           f"{self._engine.startup_timeout_s:g} s")

    def watch(self, cap_usd: float | None, on_cap: Callable[[], None],
              on_dead: Callable[[str], None]) -> None:
        """A thread: ``on_cap()`` once before the reservation's cost would pass ``cap_usd``
        (with a GPU price; the job stops as budget-exhausted), ``on_dead(reason)`` once
        every replica has failed for good (the job stops, rows left unsent)."""
        rate = getattr(self._spec.price, "gpu_hour_usd", None)
        gpus = self._engine.resources.get("GPU", 0.0)
        capped = cap_usd is not None and rate is not None and gpus > 0
        reserved_at = self.reserved_at or time.time()

        def loop() -> None:
            fired = not capped
            while not self._watch_stop.wait(BUDGET_CHECK_S):
                if not fired and cost_cap_reached(self._engine.replicas, gpus, rate or 0.0,
                                               time.time() - reserved_at, cap_usd or 0.0,
                                               BUDGET_CHECK_S + STOP_AHEAD_S):
                    log.warning("engine: the GPU time reserved would pass max_cost_usd "
                                "($%.2f); stopping the job", cap_usd)
                    on_cap()
                    fired = True
                states = self.states(timeout=STATE_TIMEOUT_S)
                if all(s["state"] == "failed" for s in states):
                    on_dead("every engine replica failed: " + "; ".join(
                        str(s.get("error")) for s in states))
                    return

        self._watcher = threading.Thread(target=loop, name="engine-watch", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        """Every server's process tree, the actors, the placement group: always all."""
        self._watch_stop.set()
        refs = [a.stop.remote() for a in self.replicas]
        try:
            ray.get(refs, timeout=60)
        except (ray.exceptions.RayError, TimeoutError) as err:
            # a killed actor's servers end anyway: their supervisor's pipe closes
            log.warning("engine: a replica did not stop cleanly (%s)", type(err).__name__)
        for a in self.replicas:
            ray.kill(a, no_restart=True)
        if self._pg is not None:
            remove_placement_group(self._pg)
            self.released_at = time.time()

    def usage(self) -> GpuUsage:
        start = self.reserved_at or time.time()
        end = self.released_at or time.time()
        return GpuUsage(self._engine.replicas, self._engine.resources.get("GPU", 0.0),
                        max(0.0, end - start))
