"""Naming the bad rank, node or link: schedules and scoring (pure, no torch or Ray).

The rank check is a pairwise ranking: every pair of ranks runs a 2-rank
all_reduce, in rounds of disjoint pairs (the circle method of a round-robin
tournament: n-1 rounds for n ranks, every pair once). A rank's score is the
median busbw of its pairs, so one slow peer cannot sink a healthy rank, while
a slow rank sinks all of its own pairs. A rank whose score is more than the
tolerance below the median score is named. Nodes are scored the same way from
node pairs, and from each node's own group.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

__all__ = [
    "describe_lag",
    "node_label",
    "node_pairs",
    "nodes_of",
    "outliers",
    "pair_scores",
    "rank_label",
    "round_robin",
]


def round_robin(items: list[Any]) -> list[list[tuple[Any, Any]]]:
    """Rounds of disjoint pairs covering every pair once (one item sits out per round if odd)."""
    if len(items) < 2:
        return []
    slots: list[Any] = list(items) + ([None] if len(items) % 2 else [])
    n = len(slots)
    rounds = []
    for _ in range(n - 1):
        pairs = [(slots[i], slots[n - 1 - i]) for i in range(n // 2)]
        rounds.append([(a, b) if items.index(a) < items.index(b) else (b, a)
                       for a, b in pairs if a is not None and b is not None])
        slots = [slots[0], slots[-1], *slots[1:-1]]  # rotate all but the first
    return rounds


def node_pairs(nodes: list[str]) -> list[tuple[str, str]]:
    """All pairs of distinct nodes, in order; empty for one node."""
    return list(itertools.combinations(list(dict.fromkeys(nodes)), 2))


def pair_scores(pairs: dict[tuple[Any, Any], float]) -> dict[Any, float]:
    """Each member's median busbw over the pairs it is in."""
    seen: dict[Any, list[float]] = {}
    for (a, b), value in pairs.items():
        seen.setdefault(a, []).append(value)
        seen.setdefault(b, []).append(value)
    return {k: statistics.median(v) for k, v in seen.items()}


def outliers(scores: dict[Any, float], tolerance: float) -> tuple[list[Any], float]:
    """(members more than ``tolerance`` below the median score, that median)."""
    if len(scores) < 3:  # with two, neither can be told from the other by a median
        return [], statistics.median(scores.values()) if scores else 0.0
    median = statistics.median(scores.values())
    return sorted(k for k, v in scores.items() if v < (1.0 - tolerance) * median), median


def nodes_of(infos: dict[int, dict[str, Any]]) -> dict[str, list[int]]:
    """node label -> its global ranks, in rank order."""
    nodes: dict[str, list[int]] = {}
    for rank in sorted(infos):
        nodes.setdefault(infos[rank]["node"], []).append(rank)
    return nodes


def rank_label(rank: int, info: dict[str, Any]) -> str:
    gpus = ",".join(str(g) for g in info.get("gpu_ids", []))
    where = f"node {info.get('node', '?')}" + (f", GPU {gpus}" if gpus else "")
    return f"rank {rank} ({where})"


def node_label(node: str, ranks: list[int]) -> str:
    return f"node {node} (ranks {', '.join(str(r) for r in ranks)})"


def describe_lag(statuses: dict[int, dict[str, Any] | None], where: dict[int, str]) -> str:
    """Name ranks that are behind the others (a hung rank never reaches the collective)."""
    seen = {r: s for r, s in statuses.items() if s is not None}
    parts = [f"rank {r} ({where.get(r, '?')}) gave no status"
             for r, s in statuses.items() if s is None]
    if seen:
        low = min(s["seq"] for s in seen.values())
        behind = sorted(r for r, s in seen.items() if s["seq"] == low)
        if low < max(s["seq"] for s in seen.values()):
            parts.append("behind: " + ", ".join(
                f"rank {r} ({where.get(r, '?')}) at step {low} [{seen[r]['phase']}]"
                for r in behind))
        waiting = sorted(r for r in seen if r not in behind or len(behind) == len(seen))
        parts.append("waiting: " + ", ".join(
            f"rank {r} at step {seen[r]['seq']} [{seen[r]['phase']}]" for r in waiting))
    return "; ".join(parts)
