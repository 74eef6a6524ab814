"""Local launcher: plan.world spawned processes on this machine, no Ray.

Each process runs a CommWorker and serves calls from its own queue, so the
checks in driver.py run here exactly as on Ray actors. A shared array holds
each rank's step counter, which names the laggard when a call times out.
"""

from __future__ import annotations

import queue as queue_mod
import time
from typing import Any

from batchrun.commcheck.bench import CommWorker
from batchrun.commcheck.driver import Driver
from batchrun.commcheck.launch import ERROR_GRACE_S, new_report, topology
from batchrun.commcheck.plan import BadInput, CommCheckError, Plan
from batchrun.commcheck.ranks import Calls, raise_for
from batchrun.commcheck.report import COULD_NOT_RUN, Report

__all__ = ["LocalRanks", "run_local"]

LOCAL = "127.0.0.1"


def _serve(rank: int, plan: Plan, inbox: Any, outbox: Any, seqs: Any) -> None:
    """Entry point of one spawned rank: answer (call id, method, args) until None."""
    worker = CommWorker(plan.backend, plan.nccl_env, plan.fault, device_index=rank)
    worker.on_progress = lambda seq, _phase: seqs.__setitem__(rank, seq)
    while (msg := inbox.get()) is not None:
        call_id, method, args = msg
        try:
            outbox.put((rank, call_id, True, getattr(worker, method)(*args)))
        except Exception as exc:  # reported to the parent, which names the rank
            outbox.put((rank, call_id, False, f"{type(exc).__name__}: {exc}"[:300]))


class LocalRanks:
    def __init__(self, plan: Plan) -> None:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")  # fork after CUDA or Ray threads is unsafe
        self.outbox, self.seqs = ctx.Queue(), ctx.Array("i", plan.world)
        self.inboxes = [ctx.Queue() for _ in range(plan.world)]
        self.procs = [ctx.Process(target=_serve, daemon=True,
                                  args=(r, plan, self.inboxes[r], self.outbox, self.seqs))
                      for r in range(plan.world)]
        self.next_id = 0
        for proc in self.procs:
            proc.start()

    def call(self, calls: Calls, timeout_s: float) -> dict[int, Any]:
        self.next_id += 1
        for rank, (method, args) in calls.items():
            self.inboxes[rank].put((self.next_id, method, args))
        deadline = time.monotonic() + timeout_s
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        while len(results) + len(errors) < len(calls) and time.monotonic() < deadline:
            try:
                rank, call_id, ok, payload = self.outbox.get(timeout=0.5)
            except queue_mod.Empty:
                continue
            if call_id != self.next_id:
                continue  # a late answer to a call that already failed
            (results if ok else errors)[rank] = payload
            if not ok:
                deadline = min(deadline, time.monotonic() + ERROR_GRACE_S)
        missing = sorted(r for r in calls if r not in results and r not in errors)
        statuses: dict[int, dict[str, Any] | None] = {
            r: {"seq": self.seqs[r], "phase": f"pid {self.procs[r].pid}"}
            for r in sorted({*missing, *errors})}
        raise_for(timeout_s, missing, errors, statuses, {r: LOCAL for r in calls})
        return results

    def close(self) -> None:
        for inbox, proc in zip(self.inboxes, self.procs):
            if proc.is_alive():
                inbox.put(None)
        for proc in self.procs:
            proc.join(timeout=2)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)


def _local_gpu_check(plan: Plan) -> None:
    if plan.backend != "nccl":
        return
    import torch  # only to count GPUs: NCCL refuses two ranks on one GPU

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if found < plan.world:
        raise BadInput(f"--backend nccl with --launcher local needs {plan.world} GPU(s) "
                       f"on this machine, found {found}")


def run_local(plan: Plan) -> Report:
    """The checks over plan.world local processes, rendezvous on 127.0.0.1."""
    _local_gpu_check(plan)
    report = new_report(plan, "local")
    ranks = LocalRanks(plan)
    try:
        found = ranks.call({r: ("probe", (r,)) for r in range(plan.world)}, plan.timeout_s)
        infos = {r: {**found[r], "rank": r, "node_ip": LOCAL, "node": LOCAL}
                 for r in range(plan.world)}
        report.ranks, report.topology = list(infos.values()), topology(list(infos.values()))
        Driver(ranks, infos, plan, report).run()
    except CommCheckError as exc:
        report.fail("setup", str(exc), COULD_NOT_RUN)
    finally:
        ranks.close()
    return report
