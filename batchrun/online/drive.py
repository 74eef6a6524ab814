"""What the runner hands online mode: the shards left to send, this run's spending gate,
and the dispatch itself, under a progress bar."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from batchrun.io.shards import Shard
from batchrun.io.writer import ResultsStore
from batchrun.money.gate import BudgetConfig, config_for
from batchrun.online.breaker import ErrorRate
from batchrun.online.dispatch import Dispatcher, ShardPlan
from batchrun.online.metrics import JobMetrics
from batchrun.spec import JobSpec

__all__ = ["budget_config", "dispatch", "plans_left", "run_interruptible"]

T = TypeVar("T")
RECANCEL_S = 1.0


def run_interruptible(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, except that Ctrl-C cancels every task of the loop, and again each
    second until the run ends, then raises KeyboardInterrupt. asyncio.run cancels the main
    task once; Python 3.11's ``wait_for`` can swallow that one cancellation (a race with
    the awaited result, fixed in 3.12), and a lane that swallowed it went on re-sending
    its shard after the user's Ctrl-C, so the driver never stopped."""
    if threading.current_thread() is not threading.main_thread():
        return asyncio.run(main)  # signals reach the main thread only
    with asyncio.Runner() as runner:
        loop = runner.get_loop()
        interrupted = False

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_later(RECANCEL_S, cancel_all)

        def on_sigint() -> None:
            nonlocal interrupted
            if not interrupted:
                interrupted = True
                cancel_all()

        loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            return runner.run(main)
        except asyncio.CancelledError:
            if interrupted:
                raise KeyboardInterrupt from None
            raise
        finally:
            loop.remove_signal_handler(signal.SIGINT)


def plans_left(spec: JobSpec, shards: list[Shard], store: ResultsStore,
               redo_errors: bool) -> tuple[list[ShardPlan], int]:
    """Shards with work left, and how many rows already have a final answer."""
    plans, done = [], 0
    # with a budget, a complete shard may hold rows it cut short: look at their ids
    budgeted = spec.budget.max_cost_usd is not None or spec.budget.daily_usd is not None
    for shard in shards:
        if store.final_rows(shard.name) == shard.num_rows and not (redo_errors or budgeted):
            done += shard.num_rows
            continue
        skip = store.answered_ids(shard.name, redo_errors=redo_errors)
        done += len(skip)
        if len(skip) < shard.num_rows or store.final_rows(shard.name) is None:
            plans.append(ShardPlan(shard, skip))
    return plans, done


def budget_config(spec: JobSpec, store: ResultsStore) -> BudgetConfig | None:
    """This run's spending gate: the job cap minus what earlier runs already spent."""
    spent = store.spent_usd() if spec.budget.max_cost_usd is not None else 0.0
    return config_for(spec, spent)


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TaskProgressColumn(), TextColumn("{task.fields[rate]} rows/s"),
        TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled,
        console=Console(stderr=True),
    )


def dispatch(spec: JobSpec, limiter: Any, workers: list[Any], key_box: list[Any],
             store: ResultsStore, plans: list[ShardPlan], total: int, done: int,
             progress: bool) -> bool:
    """Run the plans on the job's actors; returns whether the budget ran out."""
    metrics = JobMetrics(spec.name)
    with _progress(progress) as bar:
        task = bar.add_task(spec.name, total=total, completed=done, rate="-")
        t0, count = time.monotonic(), 0

        def on_rows(n: int) -> None:
            nonlocal count
            count += n
            rate = count / max(time.monotonic() - t0, 1e-9)
            bar.update(task, advance=n, rate=f"{rate:,.0f}")
            metrics.set_remaining(total - done - count)

        dispatcher = Dispatcher(limiter, workers, store, on_rows, key_box,
                                ErrorRate(spec.retry.max_error_rate, spec.retry.error_window_rows))
        run_interruptible(dispatcher.run(plans))
        return dispatcher.budget_exhausted
