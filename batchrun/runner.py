"""``batchrun run``: spec -> shards -> Ray actors -> dispatch -> results -> summary.

The driver validates everything it can before touching Ray (spec, input files
and columns, the API key), so bad input fails in a second with one line. It
starts a local Ray unless given an address (or RAY_ADDRESS), creates the named
limiter and worker actors, and always removes them in ``finally``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.job_config import JobConfig

from batchrun.api.protocols import kind_result_fields
from batchrun.api.records import warm_arrow
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.structured import Structured
from batchrun.engine.fleet import Fleet
from batchrun.engine.plan import GpuUsage, check_model_path, gpu_cost
from batchrun.errors import BudgetExhausted, ClusterError, JobCannotSucceed, SpecError, UserError
from batchrun.io import stores
from batchrun.io.lease import Lease
from batchrun.io.lease import acquire as acquire_lease
from batchrun.io.resume import check_fingerprint, refuse_duplicates
from batchrun.io.shards import Shard, carry_schema, plan_shards, record_plan, validate_input
from batchrun.io.storage import join, remove_empty_dir
from batchrun.io.summary import Summary, save_summary, summarize
from batchrun.io.writer import ResultsStore, result_schema
from batchrun.limits.limiter import BudgetConfig, RateLimiter, limiter_name
from batchrun.money.pricing import ModelPrice, price_for, worst_case_usd
from batchrun.online.dispatch import split_concurrency
from batchrun.online.drive import budget_config, dispatch, plans_left
from batchrun.online.ray_cluster import record_cluster
from batchrun.online.worker import Worker, worker_name
from batchrun.sim.for_spec import simulated_provider
from batchrun.spec import JobSpec, load_spec, resolve_api_key

__all__ = ["RunOptions", "run_job"]

log = logging.getLogger("batchrun")
WORKER_CPUS = 1.0
MAX_OUTPUT_TOKENS = 128_000  # the largest output limit of the models in the price table


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None
    retry_errors: bool = False
    force: bool = False
    mode: str | None = None  # overrides the spec's mode
    wait: bool = True  # batch mode: wait for the batches, or submit and return
    ds: str | None = None
    progress: bool = True
    include_dashboard: bool | None = None
    limit: int | None = None  # a smoke test: only the input's first N rows


def _job_config() -> JobConfig:
    """Ray puts the driver's current directory first on its workers' ``sys.path``. Started
    from a folder holding a directory named ``batchrun`` (a checkout's parent), workers
    would import that as a namespace package, not the driver's batchrun: put the folder
    that holds the driver's own package on their path too, where a regular package wins."""
    import batchrun

    return JobConfig(_py_driver_sys_path=[str(Path(batchrun.__file__).resolve().parents[1])])


def _connect(opts: RunOptions, spec: JobSpec) -> tuple[float, bool]:
    """Join or start Ray; returns (seconds taken, whether we started it).

    The cluster's address goes into the output folder: `batchrun status/stop JOB.yaml`
    from another terminal join that cluster (Ray records a local ray.init() nowhere)."""
    if ray.is_initialized():
        record_cluster(spec.output, started=False)
        return 0.0, False
    t0 = time.monotonic()
    address = opts.address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"namespace": "batchrun", "log_to_driver": True,
                              "job_config": _job_config()}
    if address:
        kwargs["address"] = address
    else:  # "local": a new Ray of our own, even if a `ray start` cluster runs here
        kwargs["address"] = "local"
        engine_cpus = (spec.engine.replicas * spec.engine.resources.get("CPU", 0.0)
                       if spec.engine else 0.0)  # an engine's bundles hold CPUs too
        kwargs["num_cpus"] = max(os.cpu_count() or 1,
                                 int(spec.workers * WORKER_CPUS + engine_cpus))
        kwargs["include_dashboard"] = opts.include_dashboard
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise ClusterError(f"cannot start or join Ray at {address or 'local'}: {e}") from e
    record_cluster(spec.output, started=not address)
    return time.monotonic() - t0, True


ENGINE_RPM = 10**9  # engine: without limits.rpm: the replicas' caps are the limit


def job_concurrency(spec: JobSpec) -> int:
    """Requests in flight, whole job: with an engine and no limits.max_concurrency of
    the user's, every replica's cap."""
    e = spec.engine
    if e is not None and "max_concurrency" not in spec.limits.model_fields_set:
        return e.replicas * e.max_concurrency_per_replica
    return spec.limits.max_concurrency


@dataclass
class JobActors:
    limiter: Any
    workers: list[Any]
    key_box: list[Any]  # held by the driver for the whole run: restarted workers read it


def _start_actors(spec: JobSpec, key: str | None, schema: pa.Schema,
                  budget: BudgetConfig | None, structured: Structured | None) -> JobActors:
    try:
        limiter = RateLimiter.options(  # type: ignore[attr-defined]
            name=limiter_name(spec.name)).remote(spec.name, spec.limits.rpm or ENGINE_RPM,
                                                 spec.limits.tpm, budget,
                                                 input_tpm=spec.limits.input_tpm,
                                                 output_tpm=spec.limits.output_tpm)
    except ValueError as e:  # the name is taken: the same job is running on this cluster
        raise UserError(f"job {spec.name!r} is already running on this Ray cluster "
                        "(its actors exist); wait for it or stop it first") from e
    # A reference inside a list, so Ray passes the reference, not the key, as the argument
    # of each run_shard. The driver holds it for the run, so a restarted worker reads it.
    key_box = [ray.put(key) if key else None]
    # the whole of max_concurrency, never more: 3 workers of 200 get 67, 67 and 66
    shares = split_concurrency(job_concurrency(spec), spec.workers)
    try:
        workers = [
            Worker.options(  # type: ignore[attr-defined]
                name=worker_name(spec.name, i), num_cpus=WORKER_CPUS).remote(
                spec, share, schema, budget is not None, structured)
            for i, share in enumerate(shares)
        ]
    except BaseException:
        ray.kill(limiter, no_restart=True)  # else its name blocks the next run
        raise
    return JobActors(limiter, workers, key_box)


def _stop_actors(actors: JobActors) -> None:
    """Return unused daily allowance, then remove every actor of the job."""
    try:
        ray.get(actors.limiter.close.remote(), timeout=30)
    except (ray.exceptions.RayError, TimeoutError) as e:
        log.warning("rate limiter did not close cleanly (%s); the next run of this job "
                    "charges its daily reservations as spent", type(e).__name__)
    for a in [actors.limiter, *actors.workers]:
        ray.kill(a, no_restart=True)


def _warn_max_tokens(spec: JobSpec, price: ModelPrice) -> None:
    """max_tokens is what the budget and TPM reserve for every row: a slip of the finger
    (1000000000) does not fail, but it should never pass silently."""
    n = spec.generation.max_tokens
    if n <= MAX_OUTPUT_TOKENS:
        return
    per_row = worst_case_usd(price, 0, n, batch=spec.mode == "batch")
    log.warning("generation.max_tokens=%s is above any current model's output limit (%s): "
                "each row may cost up to $%s in output alone, and the budget and TPM "
                "reserve that for every row; set it to the longest answer you expect",
                f"{n:,}", f"{MAX_OUTPUT_TOKENS:,}", f"{per_row:,.2f}")


def first_rows(shards: list[Shard], limit: int) -> list[Shard]:
    """The shards cut to the input's first ``limit`` rows. They keep their names, so the
    results land where a full run looks for them, and it sends only the rest."""
    out: list[Shard] = []
    for shard in shards:
        if limit <= 0:
            break
        out.append(dataclasses.replace(shard, stop=shard.start + min(limit, shard.num_rows)))
        limit -= out[-1].num_rows
    return out


@dataclass
class _Job:
    """A validated job: everything checked before a request may be sent."""

    spec: JobSpec
    shards: list[Shard]
    total: int
    store: ResultsStore
    structured: Structured | None
    lease: Lease | None = None


def _refuse_options(spec_path: str, spec: JobSpec, opts: RunOptions) -> None:
    """Options that cannot work with this spec: refused here, where every caller passes
    (the CLI, a submitted job, Python), before anything is sent."""
    if opts.limit is not None and spec.mode == "batch":
        how = ("use --mode online instead of --mode batch" if opts.mode == "batch"
               else f"add --mode online ({spec_path} says mode: batch)")
        raise UserError(f"--limit runs the first rows online: {how} for the smoke test; "
                        "a batch run afterwards sends only the rows left")
    if spec.engine is not None and spec.mode == "batch":
        raise UserError(f"{spec_path}: engine: cannot run in batch mode (a self-hosted engine "
                        "has no Batch API); run without --mode batch")
    if not opts.wait and spec.simulate is not None:
        # the simulated provider lives as long as this run: batches submitted to it
        # without waiting would be lost with it, and no later run could collect them
        raise UserError(f"{spec_path}: --no-wait cannot be used with simulate: (the simulated "
                        "provider stops when this command exits, taking its batches with it); "
                        "run without --no-wait")


def _prepare(spec_path: str, opts: RunOptions, given: JobSpec | None = None) -> _Job:
    """``given``: a spec built in Python (``batchrun.run``); ``spec_path`` then only names
    it in messages, and relative paths in it are taken from the current folder."""
    spec = load_spec(spec_path, ds=opts.ds) if given is None else given
    spec = stores.prepare(spec)  # s3://, gs://: docs/storage.md
    if opts.mode:
        spec = spec.model_copy(update={"mode": opts.mode})
    _refuse_options(spec_path, spec, opts)
    try:  # the request kind and the provider are looked up by name: an unknown one is bad input
        kind_for(spec), provider_for(spec)
        if spec.mode == "batch":
            from batchrun.batch.clients import require_batch_api

            require_batch_api(spec)  # a provider with no batch API: nothing is sent
    except SpecError as e:
        raise SpecError(f"{spec_path}: {e}") from None
    _warn_max_tokens(spec, price_for(spec))  # a model with no price is refused here too
    check_model_path(spec, spec_path)
    files = validate_input(spec)
    shards = plan_shards(spec, files)
    if opts.limit is not None:
        shards = first_rows(shards, opts.limit)
    refuse_duplicates(spec, files)
    structured = Structured.from_spec(spec, Path(spec_path).parent)
    for problem in structured.strict_problems() if structured else []:
        log.warning("response_format: %s", problem)
    # batch results name their batch; rows sent online (fallback) leave it empty
    extra = [pa.field("batch_id", pa.string())] if spec.mode == "batch" else []
    extra += structured.result_fields() if structured else []
    extra += provider_for(spec).result_fields()  # Anthropic's cache-token columns
    extra += kind_result_fields(kind_for(spec), spec)  # embeddings: the vector column
    store = ResultsStore(spec.output, result_schema(carry_schema(spec, shards), extra))
    store.check_writable()
    lease = acquire_lease(spec.output)  # an output in a store: one driver at a time
    if lease is not None:
        store.guard = lease.check  # a lost lease stops every later write
    try:
        check_fingerprint(spec, files, force=opts.force,
                          schema=structured.schema if structured else None)
        record_plan(spec, files)  # later runs of this output find the same shards
        if spec.mode == "online":  # rows of an open batch would be paid twice
            from batchrun.batch.state import refuse_open_batches

            refuse_open_batches(spec)
    except BaseException:
        if lease is not None:
            lease.release()
        raise
    return _Job(spec, shards, sum(s.num_rows for s in shards), store, structured, lease)


@dataclass
class _Run:
    """What this run did so far: what its summary reports, even when it stops early."""

    started: datetime
    t0: float
    ray_s: float | None = None  # Ray's start-up, when this run started Ray
    exhausted: bool = False
    pending: int = 0
    engine: GpuUsage | None = None  # the engine's GPU time, once released


def _run_online(job: _Job, spec: JobSpec, key: str | None, opts: RunOptions,
                run: _Run) -> None:
    """Send every row without a result."""
    plans, done = plans_left(spec, job.shards, job.store, opts.retry_errors)
    budget = budget_config(spec, job.store)
    if plans and budget is not None and budget.job_cap_usd == 0.0:
        run.exhausted = True  # earlier runs spent the whole cap
        return
    if not plans:
        if job.total and opts.limit is not None:
            log.info("the first %d rows already have results; run without --limit to send "
                     "the rest", job.total)
        elif job.total:  # an empty input is not "complete": the CLI says it has 0 rows
            log.info("job %s is already complete: %d rows in %s", spec.name, job.total,
                     spec.output)
        return
    ray_s, started_ray = _connect(opts, spec)
    run.ray_s = ray_s if started_ray else None
    actors: JobActors | None = None
    fleet = Fleet(spec, spec.workers * WORKER_CPUS) if spec.engine is not None else None
    try:
        if fleet is not None:  # replicas first: workers route to them from their first row
            fleet.start()
        actors = _start_actors(spec, key, job.store.schema, budget, job.structured)
        if fleet is not None:
            fleet.watch(spec.budget.max_cost_usd, actors.limiter.exhaust.remote,
                        actors.limiter.halt.remote)
        warm_arrow()  # before the first table arrives, not while it is written
        run.exhausted = dispatch(spec, actors.limiter, actors.workers, actors.key_box,
                                 job.store, plans, job.total, done, opts.progress)
    finally:
        if actors is not None:
            _stop_actors(actors)
        if fleet is not None:  # every server's process tree, the actors, the reservation
            fleet.stop()
            run.engine = fleet.usage()
        if started_ray:
            ray.shutdown()


def _run_batch(job: _Job, spec: JobSpec, opts: RunOptions) -> tuple[int, int, bool]:
    """Batch API mode: (batches pending, rows left for the online path, budget exhausted)."""
    from batchrun.batch import run_batch_job

    s = job.structured
    out = run_batch_job(spec, wait=opts.wait, retry_errors=opts.retry_errors,
                        check=s.check if s else None,
                        extra_body=s.request_fields() if s else None,
                        extra_fields=s.result_fields() if s else None,
                        force=opts.force, schema=s.schema if s else None)
    return out.pending, out.fallback_rows, out.budget_exhausted


def _send(job: _Job, spec: JobSpec, key: str | None, opts: RunOptions, run: _Run) -> None:
    fallback = 0
    if spec.mode == "batch":
        run.pending, fallback, run.exhausted = _run_batch(job, spec, opts)
    # Online fallback only once no batch is open (their rows would be paid twice)
    # and the budget is not spent: then the rows without results are exactly those
    # the batches failed to answer.
    if spec.mode == "online" or (fallback and not run.pending and not run.exhausted):
        _run_online(job, spec, key, opts, run)


def _summarize(job: _Job, spec: JobSpec, run: _Run) -> Summary:
    """The summary of this run, from the results on disk, saved as OUTPUT/summary.json."""
    store = job.store  # every shard final: no checkpoints are left, nor their folder
    remove_empty_dir(join(store.root, "parts"), fs=store.fs)
    # Ray's start-up is reported on its own, not in the job's wall time and rates
    wall = time.monotonic() - run.t0 - (run.ray_s or 0.0)
    summary = summarize(store.result_files(), job=spec.name,
                        wall_s=wall, run_started=run.started,
                        total_rows=job.total, ray_startup_s=run.ray_s,
                        budget_exhausted=run.exhausted, pending_batches=run.pending,
                        output=str(spec.output), fs=store.fs)
    if run.engine is not None:
        rate = getattr(spec.price, "gpu_hour_usd", None)
        summary = summary.model_copy(update={"engine": gpu_cost(
            run.engine, rate, summary.rows_this_run, summary.completion_tokens)})
    save_summary(summary, join(store.root, "summary.json"), fs=store.fs)
    return summary


def run_job(spec_path: str, opts: RunOptions = RunOptions(), *,
            spec: JobSpec | None = None) -> Summary:
    """Run (or resume) the job in ``spec_path`` (or ``spec``, built in Python, which
    ``spec_path`` then names); returns its summary. A run that stops early (exit 4, 5,
    7) saves the summary of what it left on disk too, then raises."""
    job = _prepare(spec_path, opts, spec)
    try:
        return _run_prepared(job, spec_path, opts)
    finally:
        if job.lease is not None:
            job.lease.release()


def _run_prepared(job: _Job, spec_path: str, opts: RunOptions) -> Summary:
    with simulated_provider(job.spec) as spec:
        key = resolve_api_key(spec, spec_path=spec_path)
        run = _Run(datetime.now(UTC), time.monotonic())
        try:
            _send(job, spec, key, opts, run)
        except (BudgetExhausted, ClusterError, JobCannotSucceed) as stop:
            # summary.json must describe this run, not the one before it
            run.exhausted = run.exhausted or isinstance(stop, BudgetExhausted)
            try:
                _summarize(job, spec, run)
            except Exception as e:  # the stop's own error is the one to report
                log.warning("could not save the summary (%s)", type(e).__name__)
            raise
        return _summarize(job, spec, run)
