"""Ray launcher: a placement group with one bundle per rank, one actor per bundle.

Ray and torch are imported inside the functions: the local launcher needs no
Ray, and the driver never needs torch. The placement group is removed and the
actors killed in ``finally``, whatever happened; every ray.get has a timeout.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from batchrun.commcheck.bench import INSTALL_HINT, CommWorker
from batchrun.commcheck.driver import Driver
from batchrun.commcheck.plan import BadInput, CommCheckError, Plan, collect_nccl_env
from batchrun.commcheck.ranks import Calls, raise_for
from batchrun.commcheck.report import COULD_NOT_RUN, Report

__all__ = ["ACTOR_PREFIX", "BadInput", "CommCheckError", "Plan", "RayRanks", "check_capacity",
           "collect_nccl_env", "new_report", "run_ray", "topology"]

ACTOR_PREFIX = "batchrun:commcheck:rank-"
ERROR_GRACE_S = 5.0  # after one rank fails, how long the others get to report


def new_report(plan: Plan, launcher: str) -> Report:
    settings = {k: v for k, v in asdict(plan).items() if k not in ("nccl_env", "fault")}
    settings.update(launcher=launcher, timestamp=datetime.now(UTC).isoformat())
    return Report(settings=settings, world_size=plan.world, ops=list(plan.ops),
                  env=dict(plan.nccl_env), min_busbw=plan.min_busbw)


def topology(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    per_node: dict[str, int] = {}
    for info in ranks:
        per_node[info["node"]] = per_node.get(info["node"], 0) + len(info["gpu_ids"])
    return {
        "nodes": len(per_node), "gpus_per_node": per_node,
        "hostnames": sorted({i["hostname"] for i in ranks}),
        "gpu_names": sorted({i["gpu_name"] for i in ranks if i.get("gpu_name")}),
        "nccl": sorted({i["nccl"] for i in ranks if i.get("nccl")}),
        "torch": sorted({i["torch"] for i in ranks}),
    }


class RayRanks:
    """Ranks as Ray actors; status() answers from its own concurrency group."""

    def __init__(self, actors: list[Any], where: dict[int, str]) -> None:
        self.actors, self.where = actors, where

    def call(self, calls: Calls, timeout_s: float) -> dict[int, Any]:
        import ray
        from ray.exceptions import RayError

        refs = {getattr(self.actors[r], m).remote(*args): r for r, (m, args) in calls.items()}
        deadline = time.monotonic() + timeout_s
        pending, results, errors = list(refs), {}, {}
        while pending and time.monotonic() < deadline:
            ready, pending = ray.wait(pending, num_returns=1,
                                      timeout=max(0.0, deadline - time.monotonic()))
            for ref in ready:
                try:
                    results[refs[ref]] = ray.get(ref, timeout=timeout_s)
                except RayError as exc:
                    errors[refs[ref]] = str(exc).strip().splitlines()[-1][:300]
                    deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        missing = sorted(refs[p] for p in pending)
        if missing:  # every rank that did not answer well, to tell laggards from waiters
            statuses = {r: self._status(r) for r in sorted({*missing, *errors})}
            raise_for(timeout_s, missing, errors, statuses, self.where)
        raise_for(timeout_s, missing, errors, {}, self.where)
        return results

    def _status(self, rank: int) -> dict[str, Any] | None:
        import ray

        try:
            ref = self.actors[rank].status.options(concurrency_group="status").remote()
            return dict(ray.get(ref, timeout=5))
        except Exception:  # a dead or wedged actor: reported as "gave no status"
            return None


def _bundle(plan: Plan) -> dict[str, float]:
    if plan.backend == "nccl":
        return {"GPU": 1, "CPU": plan.cpus_per_rank}
    return {"CPU": plan.cpus_per_rank}


def check_capacity(plan: Plan, total: dict[str, float]) -> None:
    """More ranks than the cluster could ever hold is bad input, said before reserving."""
    gpus, cpus = total.get("GPU", 0), total.get("CPU", 0)
    if plan.backend == "nccl" and not gpus:
        raise BadInput("--backend nccl needs GPUs and the Ray cluster has none (use --backend "
                       "gloo for CPU-only clusters, --autoscale if it adds GPU nodes on demand)")
    if plan.backend == "nccl" and plan.world > gpus:
        raise BadInput(f"--gpus {plan.world}: the Ray cluster has {gpus:g} GPU(s); ask for "
                       f"at most {gpus:g} (or pass --autoscale if it adds nodes on demand)")
    if plan.world * plan.cpus_per_rank > cpus:
        raise BadInput(f"--gpus {plan.world} x --cpus-per-rank {plan.cpus_per_rank:g} needs "
                       f"{plan.world * plan.cpus_per_rank:g} CPUs; the Ray cluster has {cpus:g}")


def _missing_resources(bundles: list[dict[str, float]], strategy: str) -> str:
    import ray

    total, avail = ray.cluster_resources(), ray.available_resources()
    want: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            want[k] = want.get(k, 0) + v
    parts = [f"{k}: requested {v:g}, cluster has {total.get(k, 0):g}, "
             f"available {avail.get(k, 0):g}" for k, v in sorted(want.items())]
    short = [k for k, v in want.items() if avail.get(k, 0) < v]
    hint = f"short of {', '.join(sorted(short))}" if short else (
        f"totals fit, but no placement satisfies {strategy} (per-node capacity)")
    return f"{len(bundles)} bundles {bundles[0]} ({strategy}): " + "; ".join(parts) + f" — {hint}"


def _wait_pg(pg: Any, bundles: list[dict[str, float]], plan: Plan) -> None:
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        ray.get(pg.ready(), timeout=plan.reserve_s)
    except GetTimeoutError:
        raise CommCheckError(f"placement group not ready after {plan.reserve_s:g}s: "
                             + _missing_resources(bundles, plan.strategy)) from None


def _resource_opts(plan: Plan) -> dict[str, float]:
    return {"num_cpus": plan.cpus_per_rank, "num_gpus": 1 if plan.backend == "nccl" else 0}


def _bundle_order(pg: Any, plan: Plan) -> list[int]:
    """Bundle indices sorted by node then GPU, probed by a small task in each bundle."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    @ray.remote
    def where() -> tuple[str, str, list[str]]:
        ctx = ray.get_runtime_context()
        gpus = [str(g) for g in ray.get_gpu_ids()]
        return ray.util.get_node_ip_address(), ctx.get_node_id(), gpus

    refs = [where.options(**_resource_opts(plan), scheduling_strategy=(
        PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i))).remote()
        for i in range(plan.world)]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=plan.reserve_s)
    if len(ready) < len(refs):
        late = [i for i, r in enumerate(refs) if r not in ready]
        raise CommCheckError(f"bundles {late} did not start a task within {plan.reserve_s:g}s "
                             "(workers still starting, or the nodes are unreachable)")
    found = ray.get(refs, timeout=plan.timeout_s)

    def key(i: int) -> tuple[str, str, list[int]]:
        ip, node, gpus = found[i]
        return ip, node, [int(g) if g.isdigit() else 0 for g in gpus]

    return sorted(range(plan.world), key=key)


def _start_actors(pg: Any, plan: Plan, order: list[int]) -> list[Any]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # A second concurrency group lets status() answer while run_size() blocks.
    cls = ray.remote(concurrency_groups={"status": 1})(CommWorker)  # type: ignore[call-overload]
    return [cls.options(name=f"{ACTOR_PREFIX}{rank}", **_resource_opts(plan),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=bundle))
            .remote(plan.backend, plan.nccl_env, plan.fault) for rank, bundle in enumerate(order)]


def _kill_all(actors: list[Any]) -> None:
    import ray

    for actor in actors:
        ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + 10
    for rank in range(len(actors)):  # wait until the names are free for the next run
        while time.monotonic() < deadline:
            try:
                ray.get_actor(f"{ACTOR_PREFIX}{rank}")
            except ValueError:
                break
            time.sleep(0.1)


def label_nodes(infos: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Node label = IP, plus a node-id prefix where several Ray nodes share one IP."""
    ids_per_ip: dict[str, set[str]] = {}
    for info in infos.values():
        ids_per_ip.setdefault(info["node_ip"], set()).add(info.get("node_id", ""))
    for info in infos.values():
        shared = len(ids_per_ip[info["node_ip"]]) > 1
        info["node"] = f"{info['node_ip']}/{info['node_id'][:8]}" if shared else info["node_ip"]
    return infos


def _run_actors(pg: Any, plan: Plan, report: Report) -> None:
    actors = _start_actors(pg, plan, _bundle_order(pg, plan))
    try:
        probe = RayRanks(actors, {})
        found = probe.call({r: ("probe", (r,)) for r in range(plan.world)}, plan.timeout_s)
        no_torch = sorted(r for r, info in found.items() if info.get("torch") is None)
        if no_torch:
            raise CommCheckError(f"torch is missing on the node(s) of rank(s) {no_torch}: "
                                 f"install it there ({INSTALL_HINT})")
        infos = label_nodes({r: {**found[r], "rank": r} for r in range(plan.world)})
        report.ranks, report.topology = list(infos.values()), topology(list(infos.values()))
        ranks = RayRanks(actors, {r: i["node"] for r, i in infos.items()})
        Driver(ranks, infos, plan, report).run()
    finally:
        _kill_all(actors)


def run_ray(plan: Plan, address: str | None = None) -> Report:
    """Reserve plan.world bundles, run the checks on one actor per bundle, release all."""
    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import placement_group, remove_placement_group

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    report = new_report(plan, "ray")
    try:
        if not plan.autoscale:  # an autoscaler starts nodes for the placement group instead
            check_capacity(plan, ray.cluster_resources())
        bundles = [_bundle(plan) for _ in range(plan.world)]
        pg = placement_group(bundles, strategy=plan.strategy, name="batchrun:commcheck")
        try:
            _wait_pg(pg, bundles, plan)
            _run_actors(pg, plan, report)
        except CommCheckError as exc:
            report.fail("setup", str(exc), COULD_NOT_RUN)
        except RayError as exc:  # e.g. an actor that died while starting
            report.fail("setup", f"{type(exc).__name__}: "
                        + str(exc).strip().splitlines()[-1][:300], COULD_NOT_RUN)
        finally:
            remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()
    return report
