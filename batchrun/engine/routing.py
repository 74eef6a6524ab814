"""Which replica takes the next request: pure arithmetic, no Ray, no I/O.

A worker holds one ``Router``. It knows the replicas' last reported states (``update``),
how many requests it has in flight on each (``acquire``/``release``), and which ones just
failed a request (``suspect``). The rule:

1. only ready replicas, not suspected, under this worker's share of the replica's
   ``max_concurrency_per_replica`` (``share_of_cap``: the shares of all workers sum to
   the cap, so a replica never holds more than the cap in flight);
2. least outstanding requests first;
3. on a tie, a replica on the worker's own node (no network hop), then the lowest index.

A suspected replica (a request to it failed to connect, was reset or timed out) is left
out until its actor reports a new generation (it was restarted) or ``SUSPECT_S`` passes
(a one-off timeout must not bench a healthy replica for good).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SUSPECT_S", "ReplicaView", "Router", "share_of_cap"]

SUSPECT_S = 5.0


def share_of_cap(cap: int, workers: int, index: int) -> int:
    """Worker ``index``'s share of one replica's cap: all of it over the workers, never
    more, at least one (with more workers than the cap, the cap is exceeded by design
    rather than leaving workers with no replica at all)."""
    n = max(1, workers)
    return max(1, cap // n + (index % n < cap % n))


@dataclass(frozen=True)
class ReplicaView:
    """What a replica's actor last said about itself (``EngineReplica.state``)."""

    index: int
    state: str  # "starting", "ready", "restarting", "failed", "stopped"
    url: str | None = None  # base URL ending in /v1
    node_id: str | None = None
    generation: int = 0  # how many times its server was (re)started
    error: str | None = None


@dataclass
class _Slot:
    view: ReplicaView
    outstanding: int = 0
    suspect_gen: int | None = None
    suspect_until: float = 0.0


class Router:
    def __init__(self, share: int, node_id: str | None = None):
        self.share = share
        self.node_id = node_id
        self._slots: dict[int, _Slot] = {}

    def update(self, views: list[ReplicaView]) -> None:
        """The replicas' fresh states; outstanding counts carry over."""
        for v in views:
            slot = self._slots.get(v.index)
            if slot is None:
                self._slots[v.index] = _Slot(v)
            else:
                slot.view = v

    def _usable(self, s: _Slot, now: float) -> bool:
        if s.view.state != "ready" or s.view.url is None or s.outstanding >= self.share:
            return False
        return not (s.suspect_gen == s.view.generation and now < s.suspect_until)

    def pick(self, now: float) -> ReplicaView | None:
        """The replica for the next request, or None when none may take one now."""
        best = min((s for s in self._slots.values() if self._usable(s, now)),
                   key=lambda s: (s.outstanding, s.view.node_id != self.node_id, s.view.index),
                   default=None)
        return None if best is None else best.view

    def acquire(self, now: float) -> ReplicaView | None:
        v = self.pick(now)
        if v is not None:
            self._slots[v.index].outstanding += 1
        return v

    def release(self, index: int) -> None:
        slot = self._slots.get(index)
        if slot is not None and slot.outstanding > 0:
            slot.outstanding -= 1

    def suspect(self, view: ReplicaView, now: float) -> None:
        """A request to ``view`` failed the way a dead server fails: avoid it for a while."""
        slot = self._slots.get(view.index)
        if slot is not None and slot.view.generation == view.generation:
            slot.suspect_gen, slot.suspect_until = view.generation, now + SUSPECT_S

    def outstanding(self) -> dict[int, int]:
        return {i: s.outstanding for i, s in self._slots.items()}

    def all_failed(self) -> list[ReplicaView] | None:
        """Every replica gave up (its restarts spent): their views, else None."""
        views = [s.view for s in self._slots.values()]
        if views and all(v.state in ("failed", "stopped") for v in views):
            return views
        return None
