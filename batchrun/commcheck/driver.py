"""The checks of one run, in order, over any launcher's ranks.

1. GPU health (nccl): NVML readings, copy and matmul per GPU, GPU count per node.
2. The sweep: every requested collective at every size over the whole group,
   one call per size, so a size that times out is a row of its own beside the
   sizes that finished.
3. With several nodes and nccl, the same sweep with NCCL_ALGO=Ring forced.
4. The rank check (3 ranks or more): pairwise ranking, confirmed by a second
   pass before a rank is named, then the group measured without it.
5. Localisation by node when something failed (or --pairwise): each node's own
   group, and node pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from batchrun.commcheck.collectives import OPS
from batchrun.commcheck.health import evaluate_health, reference_busbw
from batchrun.commcheck.localize import (
    node_label,
    nodes_of,
    outliers,
    pair_scores,
    rank_label,
    round_robin,
)
from batchrun.commcheck.plan import Plan
from batchrun.commcheck.ranks import RankFailed, Ranks, RankTimeout
from batchrun.commcheck.report import COULD_NOT_RUN, DTYPES, Report, Row, algbw_gbps

__all__ = ["Driver", "Group"]

_TEARDOWN_S = 30.0
_TRIGGERS = ("min_busbw", "reference_busbw", "rank_outlier")


@dataclass
class Group:
    name: str
    ranks: list[int]  # global ranks; the i-th is rank i of the group
    env: dict[str, str] = field(default_factory=dict)


class Driver:
    def __init__(self, ranks: Ranks, infos: dict[int, dict[str, Any]], plan: Plan,
                 report: Report) -> None:
        self.ranks, self.infos, self.plan, self.report = ranks, infos, plan, report
        self.nodes = nodes_of(infos)

    def run(self) -> None:
        """Every check; a timeout or a rank's error ends the run with what was measured."""
        try:
            if self.plan.health:
                self.health()
            everyone = Group("all", sorted(self.infos))
            self.sweep([everyone], self.plan.ops, self.plan.sizes, self.report.rows)
            self.ring()
            self.reference_check()
            if self.plan.do_rank_check:
                self.rank_check()
            self.localise()
        except RankTimeout as exc:
            self.report.fail("timeout", str(exc))
        except RankFailed as exc:
            self.report.fail("rank_error", str(exc), COULD_NOT_RUN)

    # ---- groups and sweeps ------------------------------------------------------------
    def _open(self, groups: list[Group]) -> None:
        firsts = {g.ranks[0]: g for g in groups}
        ports = self.ranks.call({r: ("free_port", ()) for r in firsts}, self.plan.timeout_s)
        calls = {}
        for first, g in firsts.items():
            addr, env = self.infos[first]["node_ip"], {**self.plan.nccl_env, **g.env}
            for i, r in enumerate(g.ranks):
                calls[r] = ("setup", (i, len(g.ranks), addr, ports[first],
                                      self.plan.timeout_s, env))
        self.ranks.call(calls, self.plan.timeout_s)

    def sweep(self, groups: list[Group], ops: list[str], sizes: list[int],
              sink: list[Row]) -> None:
        """Run groups side by side through ops x sizes; rows land in sink as they finish."""
        self._open(groups)
        todo = [(op, size) for op in ops for size in sizes]
        for i, (op, size) in enumerate(todo):
            live = [g for g in groups if self._fits(op, size, len(g.ranks))]
            if not live:
                continue
            calls = {r: ("run_size", (op, size, self.plan.bench_plan()))
                     for g in live for r in g.ranks}
            try:
                answers = self.ranks.call(calls, self.plan.timeout_s)
            except RankTimeout:
                for g in live:
                    sink.append(self._empty(op, size, g, "timeout"))
                    sink.extend(self._empty(o, s, g, "not run") for o, s in todo[i + 1:])
                raise
            for g in live:
                sink.append(Row.measured(answers[g.ranks[0]], self.plan.dtype, len(g.ranks),
                                         g.name, g.ranks,
                                         [answers[r]["own_oop_s"] for r in g.ranks]))
        self.ranks.call({r: ("teardown", ()) for g in groups for r in g.ranks}, _TEARDOWN_S)
    def _fits(self, op: str, size: int, n: int) -> bool:
        """Whether the op runs at this size on n ranks; if not, the report says why, once."""
        if n < OPS[op].min_ranks():
            note = f"{op} needs 2 ranks: not run on a group of one"
        elif OPS[op].layout(size, n, DTYPES[self.plan.dtype][0]).count == 0:
            note = f"{op}: {size} B is less than one element per rank for {n} ranks: skipped"
        else:
            return True
        if note not in self.report.notes:
            self.report.notes.append(note)
        return False

    def _empty(self, op: str, size: int, g: Group, status: str) -> Row:
        return Row.empty(op, size, self.plan.dtype, len(g.ranks), status, g.name, g.ranks)

    # ---- health, ring, reference -----------------------------------------------------
    def health(self) -> None:
        calls = {r: ("gpu_health", (self.plan.health_opts,)) for r in self.infos}
        raw = self.ranks.call(calls, self.plan.timeout_s)
        gpus, counts, failures = evaluate_health(raw, self.infos, self.plan.gpus_per_node)
        self.report.health, self.report.node_gpus = gpus, counts
        self.report.failures.extend(failures)

    def ring(self) -> None:
        if len(self.nodes) < 2 or self.plan.backend != "nccl":
            return
        if "NCCL_ALGO" in self.plan.nccl_env:
            self.report.notes.append(f"NCCL_ALGO={self.plan.nccl_env['NCCL_ALGO']} was set: "
                                     "no separate NCCL_ALGO=Ring run")
            return
        ring = Group("all NCCL_ALGO=Ring", sorted(self.infos), {"NCCL_ALGO": "Ring"})
        self.sweep([ring], self.plan.ops, self.plan.sizes, self.report.groups)
        if self.plan.min_busbw is None:
            return
        for op in self.plan.ops:
            rows = [r for r in self.report.groups if r.group == ring.name and r.op == op]
            values = [v for r in rows for v in (r.oop_busbw, r.ip_busbw) if v is not None]
            avg = sum(values) / len(values) if values else 0.0
            if avg < self.plan.min_busbw:
                self.report.fail("min_busbw", f"{op} with NCCL_ALGO=Ring: avg busbw {avg:.3f} "
                                 f"GB/s is below --min-busbw {self.plan.min_busbw:g}")

    def reference_check(self) -> None:
        """One node, nccl: the largest sizes against the GPU model's NVLink figure."""
        names = {i.get("gpu_name") for i in self.infos.values()}
        if self.plan.backend != "nccl" or len(self.nodes) != 1 or len(self.infos) < 2:
            return
        floor, source = reference_busbw(next(iter(names)) if len(names) == 1 else None)
        big = [r for r in self.report.rows if r.status == "ok" and r.size >= 64 << 20]
        if floor is None or not big:
            self.report.notes.append("no NVLink reference applies (model, or no size >= 64 MiB)")
            return
        for op in self.plan.ops:
            peak = max((r.oop_busbw or 0.0 for r in big if r.op == op), default=None)
            if peak is not None and peak < floor:
                self.report.fail("reference_busbw", f"{op}: peak busbw {peak:.1f} GB/s is below "
                                 f"{floor:.0f} GB/s expected on one node ({source})")

    # ---- the rank check ---------------------------------------------------------------
    def _pair_pass(self, size: int) -> tuple[dict[tuple[int, int], float], list[Row]]:
        rows: list[Row] = []
        for pairs in round_robin(sorted(self.infos)):
            groups = [Group(f"pair {a}-{b}", [a, b]) for a, b in pairs]
            self.sweep(groups, ["all_reduce"], [size], rows)
        # The fastest iteration of each pair: a slow rank is slow every time, while a busy
        # moment of the host only slows some iterations (measured on gloo: the median and
        # the mean named healthy ranks under load, the minimum did not).
        figures = {(r.ranks[0], r.ranks[1]): algbw_gbps(r.size, (r.oop_min_us or 0) / 1e6)
                   for r in rows if r.status == "ok"}  # 2-rank all_reduce: busbw = algbw
        return figures, rows

    def rank_check(self) -> None:
        size, tol = self.plan.rank_bytes, self.plan.tolerance
        figures, rows = self._pair_pass(size)
        scores = pair_scores(figures)
        named, median = outliers(scores, tol)
        passes = [{"pairs": _pairs_json(figures), "scores": scores, "named": named}]
        if named:  # a second pass must agree: a busy moment never names a rank
            figures2, rows2 = self._pair_pass(size)
            scores2 = pair_scores(figures2)
            named2, _ = outliers(scores2, tol)
            passes.append({"pairs": _pairs_json(figures2), "scores": scores2, "named": named2})
            named, rows = [r for r in named if r in named2], rows + rows2
        self.report.rank_check = {"op": "all_reduce", "size": size, "tolerance": tol,
                                  "median_busbw": median, "named": named, "passes": passes,
                                  "rows": rows}
        without = self._without(named) if named else None
        for rank in named:
            below = 1.0 - scores[rank] / median if median else 1.0
            msg = (f"{rank_label(rank, self.infos[rank])} is {below:.0%} below the median "
                   f"pair busbw ({scores[rank]:.3g} vs {median:.3g} GB/s at {size} B)")
            self.report.fail("rank_outlier", msg + (f"; {without}" if without else ""))

    def _without(self, named: list[int]) -> str | None:
        rest = [r for r in sorted(self.infos) if r not in named]
        if len(rest) < 2:
            return None
        size, op = max(self.plan.sizes), self.plan.op
        rows: list[Row] = []
        self.sweep([Group(f"without {','.join(map(str, named))}", rest)], [op], [size], rows)
        self.report.groups.extend(rows)
        full = next((r for r in self.report.rows if r.op == op and r.size == rows[0].size), None)
        text = (f"without it the group reaches {rows[0].oop_busbw or 0:.3g} GB/s busbw "
                f"({op}, {rows[0].size} B, {len(rest)} ranks)")
        if full is not None and full.oop_busbw is not None:
            text += f", the whole group {full.oop_busbw:.3g} GB/s"
        return text

    # ---- nodes ------------------------------------------------------------------------
    def localise(self) -> None:
        triggered = any(f.check in _TRIGGERS for f in self.report.all_failures())
        if len(self.nodes) < 2:
            if self.plan.pairwise:
                self.report.notes.append("pairwise: one node, nothing extra to run")
            return
        if not (triggered or self.plan.pairwise):
            return
        size = max(self.plan.sizes)
        multi = {n: rs for n, rs in self.nodes.items() if len(rs) >= 2}
        if triggered and multi:
            self._node_groups(multi, size)
        firsts = {n: rs[0] for n, rs in self.nodes.items()}
        sizes = self.plan.sizes if self.plan.pairwise else [size]
        figures: dict[tuple[str, str], float] = {}
        for pairs in round_robin(list(firsts)):
            groups = [Group(f"{a}<->{b}", [firsts[a], firsts[b]]) for a, b in pairs]
            rows: list[Row] = []
            self.sweep(groups, [self.plan.op], sizes, rows)
            self.report.pairwise.extend(rows)
            for g, (a, b) in zip(groups, pairs):
                last = [r for r in rows if r.group == g.name and r.size == rows[-1].size]
                figures[(a, b)] = last[0].oop_busbw or 0.0 if last else 0.0
        self._name_nodes(pair_scores(figures), "node pairs (one rank per node)")

    def _node_groups(self, multi: dict[str, list[int]], size: int) -> None:
        groups = [Group(f"node {n}", rs) for n, rs in multi.items()]
        rows: list[Row] = []
        self.sweep(groups, [self.plan.op], [size], rows)
        self.report.groups.extend(rows)
        scores = {g.name[len("node "):]: next(r.oop_busbw or 0.0 for r in rows
                                              if r.group == g.name) for g in groups}
        self._name_nodes(scores, "each node's own group")

    def _name_nodes(self, scores: dict[str, float], how: str) -> None:
        named, median = outliers(scores, self.plan.tolerance)
        self.report.localisation.append(f"{how}: " + ", ".join(
            f"{n} {v:.3g} GB/s" for n, v in scores.items()) + f" (median {median:.3g})")
        for node in named:
            below = 1.0 - scores[node] / median if median else 1.0
            self.report.fail("node_outlier", f"{node_label(node, self.nodes[node])} is "
                             f"{below:.0%} below the median busbw of {how}")


def _pairs_json(figures: dict[tuple[int, int], float]) -> list[dict[str, Any]]:
    return [{"ranks": list(k), "busbw": v} for k, v in sorted(figures.items())]
