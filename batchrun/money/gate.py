"""One budget gate for both modes: the job's cap and the shared daily ledger, in one class.

Every request (online) or chunk (batch) reserves its worst case before it may be sent,
and settles at what it really cost when its answer comes back; with any number in
flight, spend plus reservations never exceed the job cap, nor the day's allowance.
Once a reservation is refused the gate stays shut for the run ("in order": no later
request or chunk jumps the queue); the rows left are unsent, and a later run with a
raised cap or a new day resumes them.

The daily allowance is drawn from the file ledger (``budget.DailyLedger``: a lock and
an fsync per call) by a background thread, never by the caller of ``reserve``:

- the gate holds a *block* drawn in advance (``block_usd``) and tops it up when it
  falls under half; a reservation is taken from the block, in memory;
- ``reserve`` waits only when the block cannot cover a request, until a draw started
  after that miss comes back; it refuses only when that draw came back short (the
  ledger itself is spent for the day);
- settlements are written to the ledger by the same thread, at most every
  ``flush_every_s``, and at ``close`` with the unused allowance handed back.

A crash leaves the job's reservations in the ledger (a settlement not yet written is
still a reservation there); the next run of the job, in either mode, charges them as
spent (``charge_crashed_run``), since the requests they covered may have been billed.
``ledger_id`` names the job in the ledger the same way in both modes for that reason.
"""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from batchrun.api.registry import kind_for
from batchrun.io import stores
from batchrun.io.shards import RequestRow
from batchrun.io.stores import StoreConfig
from batchrun.money.budget import DEFAULT_MARGIN, NANO, BudgetBook, DailyLedger, nano_usd
from batchrun.money.pricing import ModelPrice, worst_case_usd
from batchrun.spec import JobSpec

__all__ = ["BLOCK_USD", "BudgetConfig", "Gate", "config_for", "ledger_id", "row_worst_usd"]

BLOCK_USD = 0.05  # daily allowance an online job draws ahead: one ledger write per block
_FLUSH_EVERY_S = 0.25  # how often settled spend is written to the ledger while running


@dataclass(frozen=True)
class BudgetConfig:
    """What a gate needs (plain data: it travels to the limiter actor as an argument)."""

    job_cap_usd: float | None
    daily_usd: float | None = None
    ledger_dir: str | None = None
    timezone: str = "UTC"
    job_id: str = ""
    storage: StoreConfig | None = None  # a ledger in a store: its endpoint (no secrets)


def ledger_id(spec: JobSpec) -> str:
    """The job's name in the daily ledger: the same for every run of the job in either
    mode (its name and output folder), so a rerun charges what a crashed run left."""
    out = spec.output if "://" in spec.output else str(Path(spec.output).resolve())
    return f"{spec.name}@{hashlib.sha1(out.encode()).hexdigest()[:8]}"


def config_for(spec: JobSpec, committed_usd: float = 0.0) -> BudgetConfig | None:
    """The gate of one run of ``spec``: the job cap less what is already committed
    (spent by earlier runs, or owed to open batches); None without any budget."""
    b = spec.budget
    if b.max_cost_usd is None and b.daily_usd is None:
        return None
    cap = None if b.max_cost_usd is None else max(0.0, b.max_cost_usd - committed_usd)
    return BudgetConfig(job_cap_usd=cap, daily_usd=b.daily_usd, ledger_dir=b.ledger_dir,
                        timezone=b.timezone, job_id=ledger_id(spec),
                        storage=stores.config() if stores.is_store(b.ledger_dir or "") else None)


def row_worst_usd(spec: JobSpec, price: ModelPrice | None, row: RequestRow) -> float:
    """The most one batch request can cost: prompt estimate + 2% + ``max_tokens``."""
    if price is None or row.messages is None:
        return 0.0
    prompt = kind_for(spec).prompt_tokens(row.messages, spec.model)
    return worst_case_usd(price, prompt, spec.generation.max_tokens, batch=True,
                          margin=DEFAULT_MARGIN)


class Gate:
    """The job cap (``BudgetBook``) and the daily allowance drawn from ``ledger``.

    Thread-safe; the callers' methods do no file I/O except ``charge_crashed_run``,
    ``start`` (the first block) and ``close``. Daily amounts are integer nano-USD, the
    ledger's unit, so a reservation is handed back exactly as it was taken.
    """

    def __init__(self, job_cap_usd: float | None, ledger: DailyLedger | None = None,
                 job_id: str = "", *, block_usd: float = 0.0,
                 flush_every_s: float = _FLUSH_EVERY_S, restarted: bool = False):
        self.book = BudgetBook(job_cap_usd)
        self._ledger, self._job_id = ledger, job_id
        self._limited = job_cap_usd is not None or ledger is not None
        self._block = nano_usd(block_usd)
        self._flush_every = flush_every_s
        self._cond = threading.Condition()
        self._free = 0  # drawn from the ledger, not reserved by any request
        self._need = 0  # the request the block could not cover: the next draw covers it
        self._pending = [0, 0]  # settled, not yet written: [reserved, actual]
        self._started = self._done = 0  # draws started / come back (one at a time)
        self._last_short = False  # the last draw got less than it asked for
        self._flushed_at = time.monotonic()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._error: Exception | None = None
        self._admitted: dict[object, float] = {}  # batch chunks reserved by this run
        # A restarted limiter lost its reservations: it refuses all spending, and the
        # settlements of the requests its first life reserved are still recorded.
        self._restarted = restarted
        self.exhausted = restarted
        self.draws = 0  # ledger draws made (for tests and stats)

    @classmethod
    def open(cls, cfg: BudgetConfig | None, *, block_usd: float = 0.0,
             restarted: bool = False) -> Gate:
        """The gate ``cfg`` describes (no cap and no ledger without one)."""
        if cfg is None:
            return cls(None)
        ledger = None
        if cfg.daily_usd is not None and cfg.ledger_dir:
            if cfg.storage is not None:  # the limiter actor may run on another node
                stores.configure(cfg.storage)
            ledger = DailyLedger(cfg.ledger_dir, cfg.timezone, cfg.daily_usd)
        return cls(cfg.job_cap_usd, ledger, cfg.job_id, block_usd=block_usd,
                   restarted=restarted)

    # -- per request (online) ----------------------------------------------------------

    def reserve(self, usd: float) -> bool:
        """Reserve one request's worst case; False once the cap or the day is spent."""
        with self._cond:
            return self._reserve(usd)

    def reserve_prefix(self, usds: list[float]) -> int:
        """Reserve each in order up to the first refusal; returns how many were reserved."""
        with self._cond:
            for i, usd in enumerate(usds):
                if not self._reserve(usd):
                    return i
            return len(usds)

    def release(self, usd: float) -> None:
        """A reservation whose request was never sent: back to the block."""
        with self._cond:
            self.book.release(usd)
            if self._ledger is not None:
                self._free += nano_usd(usd)

    def settle(self, reserved: float, actual: float) -> None:
        """A request came back: its reservation becomes what it really cost."""
        with self._cond:
            if self._restarted:
                self.book.record(actual)  # reserved by the limiter's first life
            else:
                self.book.settle(reserved, actual)
            if self._ledger is not None:
                if self._pending == [0, 0]:  # the feeder may sleep until there is work
                    self._ensure_feeder()
                    self._cond.notify_all()
                self._pending[0] += nano_usd(reserved)
                self._pending[1] += nano_usd(actual)

    # -- per chunk (batch) -------------------------------------------------------------

    def admit(self, key: object, usd: float) -> bool:
        """Reserve a chunk's worst case before its batch is created (once per chunk)."""
        if not self._limited or key in self._admitted:
            return True
        if self.reserve(usd):
            self._admitted[key] = usd
            return True
        return False

    def refused(self, key: object) -> bool:
        """The chunk was left unsent: the gate shut before it was admitted."""
        return self._limited and self.exhausted and key not in self._admitted

    def settle_chunk(self, key: object, actual_usd: float) -> None:
        """A collected chunk: settle it if this run admitted it (an earlier run's chunk
        is already counted, in the cap as committed and in the ledger as charged)."""
        if key in self._admitted:
            self.settle(self._admitted.pop(key), actual_usd)

    # -- the ledger ----------------------------------------------------------------------

    def charge_crashed_run(self) -> float:
        """Count what an earlier run of this job left reserved as spent (once per run,
        before the first reservation). Returns the USD charged."""
        return 0.0 if self._ledger is None else self._ledger.charge_stale(self._job_id)

    def start(self) -> None:
        """Draw the first block now (the caller's thread) and keep it topped up."""
        if self._ledger is None or self.exhausted or not self._block:
            return
        got = self._ledger.reserve_chunk(self._job_id, self._block / NANO)
        with self._cond:
            self._started += 1
            self._drawn(self._block, nano_usd(got))
            self._ensure_feeder()

    def close(self, *, release_all: bool = False) -> None:
        """Write what is settled and hand the unused allowance back to other jobs.

        ``release_all`` also frees reservations never settled (online: every request
        has come back by now); batch mode keeps those of created chunks (billed later).
        """
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        with self._cond:
            (res, act), self._pending = self._pending, [0, 0]
            free, self._free = self._free, 0
        if self._ledger is not None:
            if res or act:
                self._ledger.settle(self._job_id, res / NANO, act / NANO)
            if release_all:
                self._ledger.release_all(self._job_id)
            elif free:
                self._ledger.settle(self._job_id, free / NANO, 0.0)
        if self._error is not None:
            raise self._error

    # -- inside the lock -------------------------------------------------------------------

    def _reserve(self, usd: float) -> bool:
        units = nano_usd(usd) if self._ledger is not None else 0
        mark = self._started  # draws started before this request: a later one must come back
        while True:
            if self._error is not None:
                raise self._error
            if self.exhausted or self._closing:
                return False
            if not self.book.try_reserve(usd):
                self.exhausted = True
                return False
            if self._free >= units:
                self._free -= units
                if self._ledger is not None and self._free < self._block // 2:
                    self._cond.notify_all()  # the feeder tops the block up
                return True
            self.book.release(usd)  # not held while waiting: the cap is not this one's
            if self._done > mark:  # a draw started after the miss has come back
                if self._last_short:  # and got less than it asked: the day is spent
                    self.exhausted = True
                    return False
                mark = self._started  # whole, but too small for this one: again
            if self._need < units:
                self._need = units
                self._ensure_feeder()
                self._cond.notify_all()
            self._cond.wait(timeout=1.0)

    def _drawn(self, asked: int, got: int) -> None:
        self._free += got
        self._done += 1
        self._last_short = got < asked
        if self._last_short or self._free >= self._need:
            self._need = 0  # met, or cannot be: the waiter refuses, no draw is repeated
        self.draws += 1

    def _draw_wanted(self) -> int:
        if self._ledger is None or self.exhausted or self._closing:
            return 0
        if self._need > self._free:
            return max(self._need, self._block) - self._free
        if self._free < self._block // 2 and not self._last_short:
            return self._block - self._free  # top up (not after a short draw: none is left)
        return 0

    def _ensure_feeder(self) -> None:
        if self._thread is None and self._ledger is not None:
            self._thread = threading.Thread(target=self._feed, name="batchrun-ledger",
                                            daemon=True)
            self._thread.start()

    # -- the feeder thread -----------------------------------------------------------------

    def _next_job(self) -> tuple[int, int, int] | None:
        """Wait for work: (units to draw, reserved and actual to write); None: stop."""
        with self._cond:
            while not self._closing:
                want = self._draw_wanted()
                pending = self._pending != [0, 0]
                due = self._flushed_at + self._flush_every - time.monotonic()
                if want or (pending and due <= 0):
                    (res, act), self._pending = self._pending, [0, 0]
                    self._flushed_at = time.monotonic()
                    if want:
                        self._started += 1
                    return want, res, act
                self._cond.wait(timeout=due if pending else None)
            return None

    def _feed(self) -> None:
        assert self._ledger is not None
        while (job := self._next_job()) is not None:
            want, res, act = job
            try:
                if res or act:  # first: what it frees may serve the draw
                    self._ledger.settle(self._job_id, res / NANO, act / NANO)
                got = self._ledger.reserve_chunk(self._job_id, want / NANO) if want else 0.0
            except Exception as e:  # the ledger's folder is gone or unwritable
                with self._cond:
                    self._error = e
                    self._cond.notify_all()
                return
            with self._cond:
                if want:
                    self._drawn(want, nano_usd(got))
                self._cond.notify_all()
