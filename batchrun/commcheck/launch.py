"""Launchers: Ray placement group + one actor per bundle, or local processes.

Ray and torch are imported inside the functions: the local launcher needs no
Ray, and the driver never needs torch except to count local GPUs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from batchrun.commcheck.bench import CommWorker, free_port
from batchrun.commcheck.report import Report, Row, describe_lag, node_pairs

__all__ = ["BadInput", "CommCheckError", "Plan", "collect_nccl_env", "run_local", "run_ray"]

ACTOR_PREFIX = "batchrun:commcheck:rank-"
_ERROR_GRACE_S = 5.0  # after one rank fails, how long the others get to report


class BadInput(ValueError):
    """Invalid request (exit code 2)."""


class CommCheckError(RuntimeError):
    """The check could not complete: missing resources, a hang, a rank's error."""


@dataclass
class Plan:
    world: int
    sizes: list[int]
    backend: str = "gloo"
    dtype: str = "float32"
    op: str = "all_reduce"
    iters: int = 20
    warmup: int = 5
    check_iters: int = 2
    timeout_s: float = 120.0
    strategy: str = "PACK"
    cpus_per_rank: float = 1.0
    nccl_env: dict[str, str] = field(default_factory=dict)
    copy_baseline: bool | None = None  # None: on for one rank, where copy speed is the ceiling
    pairwise: bool = False
    min_busbw: float | None = None
    fault: str | None = None  # test hook: "wrong:RANK" or "hang:RANK"

    def bench_plan(self) -> dict[str, Any]:
        copy = self.world == 1 if self.copy_baseline is None else self.copy_baseline
        return {"sizes": self.sizes, "dtype": self.dtype, "iters": self.iters,
                "warmup": self.warmup, "check_iters": self.check_iters, "copy_baseline": copy}


def collect_nccl_env(explicit: dict[str, str]) -> dict[str, str]:
    """NCCL_* from the driver's environment, overridden by --nccl-env values."""
    env = {k: v for k, v in os.environ.items() if k.startswith("NCCL_")}
    env.update(explicit)
    return env


def _new_report(plan: Plan, launcher: str) -> Report:
    settings = {k: v for k, v in asdict(plan).items() if k not in ("nccl_env", "fault")}
    settings.update(launcher=launcher, timestamp=datetime.now(UTC).isoformat())
    return Report(settings=settings, world_size=plan.world, env=dict(plan.nccl_env),
                  min_busbw=plan.min_busbw)


def _rows(results: list[list[list[float]]], plan: Plan, world: int, group: str) -> list[Row]:
    """Element-wise max over ranks (they already agree after the in-group reduction)."""
    rows = []
    for per_size in zip(*results, strict=True):
        size, oop, ip, copy, w_oop, w_ip = (max(col) for col in zip(*per_size, strict=True))
        rows.append(Row.from_times(int(size), plan.dtype, world, oop, ip,
                                   (int(w_oop), int(w_ip)), copy or None, group))
    return rows


def _topology(ranks: list[dict[str, Any]]) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------- Ray
def _bundle(plan: Plan) -> dict[str, float]:
    if plan.backend == "nccl":
        return {"GPU": 1, "CPU": plan.cpus_per_rank}
    return {"CPU": plan.cpus_per_rank}


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
        ray.get(pg.ready(), timeout=plan.timeout_s)
    except GetTimeoutError:
        raise CommCheckError(f"placement group not ready after {plan.timeout_s:g}s: "
                             + _missing_resources(bundles, plan.strategy)) from None


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
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=plan.timeout_s)
    if len(ready) < len(refs):
        late = [i for i, r in enumerate(refs) if r not in ready]
        raise CommCheckError(f"bundles {late} did not start a task within {plan.timeout_s:g}s "
                             "(workers still starting, or the nodes are unreachable)")
    found = ray.get(refs, timeout=plan.timeout_s)

    def key(i: int) -> tuple[str, str, list[int]]:
        ip, node, gpus = found[i]
        return ip, node, [int(g) if g.isdigit() else 0 for g in gpus]

    return sorted(range(plan.world), key=key)


def _resource_opts(plan: Plan) -> dict[str, float]:
    return {"num_cpus": plan.cpus_per_rank, "num_gpus": 1 if plan.backend == "nccl" else 0}


def _start_actors(pg: Any, plan: Plan, order: list[int]) -> list[Any]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # A second concurrency group lets status() answer while run() blocks in a collective.
    cls = ray.remote(concurrency_groups={"status": 1})(CommWorker)  # type: ignore[call-overload]
    return [cls.options(name=f"{ACTOR_PREFIX}{rank}", **_resource_opts(plan),
                        scheduling_strategy=PlacementGroupSchedulingStrategy(
                            pg, placement_group_bundle_index=bundle))
            .remote(plan.backend, plan.nccl_env, plan.fault) for rank, bundle in enumerate(order)]


def _collect(refs: dict[Any, int], actors: dict[int, Any], where: dict[int, str],
             timeout_s: float) -> dict[int, Any]:
    """Wait for every rank; on a hang or error name the ranks and nodes that did not answer."""
    import ray
    from ray.exceptions import RayError

    deadline = time.monotonic() + timeout_s
    pending, results, errors = list(refs), {}, {}
    while pending and time.monotonic() < deadline:
        ready, pending = ray.wait(pending, num_returns=1,
                                  timeout=max(0.0, deadline - time.monotonic()))
        for ref in ready:
            try:
                results[refs[ref]] = ray.get(ref)
            except RayError as exc:
                errors[refs[ref]] = str(exc).strip().splitlines()[-1][:300]
                deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    msgs = [f"rank {r} ({where.get(r, '?')}) failed: {e}" for r, e in sorted(errors.items())]
    if pending:
        missing = sorted(refs[p] for p in pending)
        statuses = {r: _status(actors[r]) for r in missing}
        msgs.insert(0, f"no answer within {timeout_s:g}s from " + ", ".join(
            f"rank {r} (node {where.get(r, '?')})" for r in missing)
            + " — " + describe_lag(statuses, where))
    if msgs:
        raise CommCheckError("; ".join(msgs))
    return results


def _status(actor: Any) -> dict[str, Any] | None:
    import ray

    try:
        ref = actor.status.options(concurrency_group="status").remote()
        return dict(ray.get(ref, timeout=5))
    except Exception:  # a dead or wedged actor: reported as "gave no status"
        return None


def _run_group(actors: dict[int, Any], infos: dict[int, dict[str, Any]], plan: Plan,
               group: str) -> list[Row]:
    """One torch process group over the given ranks, Ray Train style rendezvous."""
    import ray

    ranks = sorted(actors)
    first = actors[ranks[0]]
    addr, port = infos[ranks[0]]["node_ip"], ray.get(first.free_port.remote(), timeout=30)
    refs = {actors[r].session.remote(i, len(ranks), addr, port, plan.timeout_s,
                                     plan.bench_plan()): i for i, r in enumerate(ranks)}
    local = {i: actors[r] for i, r in enumerate(ranks)}
    where = {i: infos[r]["node"] for i, r in enumerate(ranks)}
    results = _collect(refs, local, where, plan.timeout_s)
    return _rows([results[i] for i in range(len(ranks))], plan, len(ranks), group)


def _run_pairwise(actors: dict[int, Any], infos: dict[int, dict[str, Any]], plan: Plan,
                  report: Report) -> None:
    first_rank: dict[str, int] = {}
    for rank in sorted(infos):
        first_rank.setdefault(infos[rank]["node"], rank)
    pairs = node_pairs(list(first_rank))
    if not pairs:
        report.notes.append("pairwise: one node, nothing extra to run")
    for a, b in pairs:
        pair = {r: actors[r] for r in (first_rank[a], first_rank[b])}
        report.pairwise += _run_group(pair, infos, plan, f"{a}<->{b}")


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


def _label_nodes(infos: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Node label = IP, plus a node-id prefix where several Ray nodes share one IP."""
    ids_per_ip: dict[str, set[str]] = {}
    for info in infos.values():
        ids_per_ip.setdefault(info["node_ip"], set()).add(info.get("node_id", ""))
    for info in infos.values():
        shared = len(ids_per_ip[info["node_ip"]]) > 1
        info["node"] = f"{info['node_ip']}/{info['node_id'][:8]}" if shared else info["node_ip"]
    return infos


def _run_actors(pg: Any, plan: Plan, report: Report) -> None:
    import ray

    actors = _start_actors(pg, plan, _bundle_order(pg, plan))
    try:
        found = ray.get([a.probe.remote() for a in actors], timeout=plan.timeout_s)
        infos = _label_nodes({r: {**info, "rank": r} for r, info in enumerate(found)})
        report.ranks, report.topology = list(infos.values()), _topology(list(infos.values()))
        by_rank = dict(enumerate(actors))
        report.rows = _run_group(by_rank, infos, plan, "all")
        if plan.pairwise:
            _run_pairwise(by_rank, infos, plan, report)
    finally:
        _kill_all(actors)


def run_ray(plan: Plan, address: str | None = None) -> Report:
    """Reserve plan.world bundles, run the check on one actor per bundle, release all."""
    import ray
    from ray.exceptions import RayError
    from ray.util.placement_group import placement_group, remove_placement_group

    started = not ray.is_initialized()
    if started:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    report = _new_report(plan, "ray")
    try:
        if plan.backend == "nccl" and not ray.cluster_resources().get("GPU", 0):
            raise BadInput("--backend nccl needs GPUs and the Ray cluster has none "
                           "(use --backend gloo for CPU-only clusters)")
        bundles = [_bundle(plan) for _ in range(plan.world)]
        pg = placement_group(bundles, strategy=plan.strategy, name="batchrun:commcheck")
        try:
            _wait_pg(pg, bundles, plan)
            _run_actors(pg, plan, report)
        except CommCheckError as exc:
            report.error = str(exc)
        except RayError as exc:  # e.g. an actor that died while starting
            report.error = f"{type(exc).__name__}: " + str(exc).strip().splitlines()[-1][:300]
        finally:
            remove_placement_group(pg)
    finally:
        if started:
            ray.shutdown()
    return report


# -------------------------------------------------------------------------- local
def _local_main(rank: int, plan: Plan, port: int, queue: Any, seqs: Any) -> None:
    """Entry point of one spawned rank; reports (rank, ok, info, rows | error)."""
    worker = CommWorker(plan.backend, plan.nccl_env, plan.fault, device_index=rank)
    worker.on_progress = lambda seq, _phase: seqs.__setitem__(rank, seq)
    info: dict[str, Any] = {"rank": rank}
    try:
        info.update(worker.probe(), node_ip="127.0.0.1", node="127.0.0.1", rank=rank)
        rows = worker.session(rank, plan.world, "127.0.0.1", port, plan.timeout_s,
                              plan.bench_plan())
        queue.put((rank, True, info, rows))
    except Exception as exc:  # reported to the parent, which names the rank
        queue.put((rank, False, info, f"{type(exc).__name__}: {exc}"[:300]))


def _local_gpu_check(plan: Plan) -> None:
    if plan.backend != "nccl":
        return
    import torch  # only to count GPUs: NCCL refuses two ranks on one GPU

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < plan.world:
        raise BadInput(f"--backend nccl with --launcher local needs {plan.world} GPU(s) "
                       f"on this machine, found {found}")


def _local_collect(queue: Any, procs: list[Any], seqs: Any, plan: Plan) -> dict[int, Any]:
    import queue as queue_mod

    deadline = time.monotonic() + plan.timeout_s
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    infos: dict[int, dict[str, Any]] = {}
    while len(results) + len(errors) < plan.world and time.monotonic() < deadline:
        try:
            rank, ok, info, payload = queue.get(timeout=min(1.0, plan.timeout_s))
        except queue_mod.Empty:
            continue
        infos[rank] = info
        (results if ok else errors)[rank] = payload
        if not ok:
            deadline = min(deadline, time.monotonic() + _ERROR_GRACE_S)
    msgs = [f"rank {r} (127.0.0.1) failed: {e}" for r, e in sorted(errors.items())]
    missing = [r for r in range(plan.world) if r not in results and r not in errors]
    if missing:
        statuses = {r: {"seq": seqs[r], "phase": f"pid {procs[r].pid}"} for r in missing}
        where = {r: "127.0.0.1" for r in missing}
        msgs.insert(0, f"no answer within {plan.timeout_s:g}s from " + ", ".join(
            f"rank {r} (node 127.0.0.1)" for r in missing) + " — "
            + describe_lag(dict(statuses), where))
    if msgs:
        raise CommCheckError("; ".join(msgs))
    return {r: (infos[r], results[r]) for r in results}


def run_local(plan: Plan) -> Report:
    """plan.world spawned processes on this machine, rendezvous on 127.0.0.1."""
    import multiprocessing as mp

    _local_gpu_check(plan)
    report = _new_report(plan, "local")
    ctx = mp.get_context("spawn")  # fork after CUDA or Ray threads is unsafe
    queue, seqs, port = ctx.Queue(), ctx.Array("i", plan.world), free_port()
    procs = [ctx.Process(target=_local_main, args=(r, plan, port, queue, seqs), daemon=True)
             for r in range(plan.world)]
    for proc in procs:
        proc.start()
    try:
        done = _local_collect(queue, procs, seqs, plan)
        report.ranks = [done[r][0] for r in range(plan.world)]
        report.topology = _topology(report.ranks)
        report.rows = _rows([done[r][1] for r in range(plan.world)], plan, plan.world, "all")
        if plan.pairwise:
            report.notes.append("pairwise: one node, nothing extra to run")
    except CommCheckError as exc:
        report.error = str(exc)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=5)
    return report
