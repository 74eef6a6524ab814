"""batchrun inside a Ray Data pipeline: ``complete(ds, spec)`` adds a model's answer to each row.

    out = batchrun.ray_data.complete(ds, spec)   # a Dataset with the result columns added

The rows go through Ray Data's own operator (``map_batches`` over a pool of actors, an
async UDF), so the pipeline streams, and Ray Data scales the pool. What Ray Data does
not have, batchrun brings: every actor of the pool leases its send slots from ONE
``limits.limiter.RateLimiter`` actor, created by ``complete`` for this pipeline, with
the spec's RPM and TPM and ONE budget gate (``money.gate``); a 429's Retry-After pauses
every actor, not only the one that got it (the same ``online.engine.RowRunner`` as a
job's workers). Each input row gives exactly one output row: its answer, or its error,
or ``status=error, error_type=budget_exhausted`` for a row the budget left unsent.

A row's payload is built as a job's reader builds it (``io.rows.RowBuilder``: the prompt
column or ``prompt_template``, a templated ``system_prompt``, ``image_column``, the
kind); a kind whose request carries several rows (``task: embeddings``) sends a batch's
rows in groups through ``online.grouped.GroupRunner``, as a job's worker does. The
result columns are a job's: the fixed ones, then the structured, provider and kind ones.

The spec's ``input``, ``output``, ``workers``, ``shard_rows``, ``flush_rows``,
``carry_columns`` and ``schedule`` are the pipeline's business here and are ignored
(``pipeline_spec`` builds a spec without them); ``mode: batch`` and ``simulate:`` are
refused. The API key is read where the actor runs: the named environment variable if
that node has it, else a reference to the object the driver put (never a task argument).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import ray

from batchrun.api.client import ApiClient, open_session
from batchrun.api.protocols import inputs_per_request, kind_result_fields
from batchrun.api.records import RESULT_FIELDS, records_table
from batchrun.api.registry import kind_for, provider_for
from batchrun.api.secrets import redact
from batchrun.api.structured import Structured
from batchrun.errors import ClusterError, InputDataError, JobCannotSucceed, SpecError
from batchrun.io.rows import RowBuilder
from batchrun.io.shards import RequestRow
from batchrun.limits.limiter import SLOT_VALIDITY_S, RateLimiter, limiter_name
from batchrun.limits.permits import LeaseAnswer, PermitPool
from batchrun.money.gate import config_for
from batchrun.money.pricing import price_for
from batchrun.online.dispatch import split_concurrency
from batchrun.online.engine import RowRunner
from batchrun.online.grouped import GroupRunner
from batchrun.spec import JobSpec, load_spec, resolve_api_key

if TYPE_CHECKING:
    from ray.data import Dataset

__all__ = ["RESULT_COLUMNS", "complete", "pipeline_spec"]

# The job-file fields a pipeline has no use for: Ray Data reads and writes the rows.
PIPELINE_DEFAULTS = {"input": "ray-data://input", "output": "ray-data://output"}
# The result columns added to each row (a job's results less id, model and timestamps)
RESULT_COLUMNS: list[pa.Field] = [f for f in RESULT_FIELDS
                                  if f.name not in ("id", "model", "started_at", "finished_at")]
LEASE_TIMEOUT_S = 120.0


def pipeline_spec(source: JobSpec | Mapping[str, Any] | str | Path) -> JobSpec:
    """The spec of a pipeline: a ``JobSpec``, the fields of one as a mapping, or a YAML file.

    A mapping or a file may leave out ``input`` and ``output``; everything else is
    validated by the one definition (``batchrun.spec``), with the same one-line
    ``SpecError`` as ``batchrun run``.
    """
    if isinstance(source, JobSpec):
        spec = source
    elif isinstance(source, Mapping):
        spec = JobSpec(**{**PIPELINE_DEFAULTS, **source})
    else:
        spec = load_spec(source, defaults=PIPELINE_DEFAULTS)
    if spec.mode == "batch":
        raise SpecError("mode: batch cannot run inside a Ray Data pipeline (it sends rows "
                        "online, under the limiter); use batchrun.run for the Batch API")
    if spec.engine is not None:
        raise SpecError("engine: is not supported by ray_data.complete (a pipeline calls an "
                        "endpoint someone runs); use batchrun.run, or set endpoint.base_url "
                        "to your servers")
    if spec.simulate is not None:
        raise SpecError("simulate: is not supported by ray_data.complete (the simulated "
                        "provider would end with this call); start batchrun.sim yourself "
                        "and set endpoint.base_url to it")
    return spec


def _extra_fields(spec: JobSpec, structured: Structured | None) -> list[pa.Field]:
    """The columns after the fixed ones, as a job adds them (``runner.py``): ``parsed``
    (response_format), the provider's (Anthropic's cache tokens), the kind's (embedding)."""
    return [*(structured.result_fields() if structured else []),
            *provider_for(spec).result_fields(), *kind_result_fields(kind_for(spec), spec)]


def _needed(spec: JobSpec, builder: RowBuilder) -> dict[str, str]:
    """Each column the rows are read from, with the spec field that names it."""
    which = {builder.source: "prompt_column" if spec.prompt_column else "messages_column",
             spec.image_column: "image_column", spec.id_column: "id_column"}
    named = [*builder.columns, spec.id_column]
    return {c: which.get(c, "prompt_template/system_prompt") for c in named if c is not None}


def _check_columns(names: list[str] | None, spec: JobSpec, builder: RowBuilder,
                   extra: list[pa.Field]) -> None:
    """Every column the rows are built from must be there, and no result column may be:
    one line, naming the column and the spec field that asks for it."""
    if names is None:
        return  # an empty dataset without a schema: no row to send
    for col, field in _needed(spec, builder).items():
        if col not in names:
            raise InputDataError(f"dataset has no column {col!r} (the spec's {field}); its "
                                 f"columns are {', '.join(names)}: add it, e.g. with ds.map")
    taken = sorted({f.name for f in [*RESULT_COLUMNS, *extra]} & set(names))
    if taken:
        raise InputDataError(f"dataset already has the result column(s) {', '.join(taken)}; "
                             "rename or drop them before complete()")


class _Complete:
    """The UDF of one Ray Data actor: one session, ``lanes`` requests in flight, the
    pipeline's limiter. Async: Ray Data runs several batches of an actor at once."""

    def __init__(self, spec: JobSpec, limiter: Any, key_box: list[Any], lanes: int,
                 budgeted: bool, structured: Structured | None):
        self._spec, self._limiter, self._key_box = spec, limiter, key_box
        self._lanes, self._budgeted, self._structured = lanes, budgeted, structured
        self._extra = _extra_fields(spec, structured)
        self._fields = [*RESULT_COLUMNS, *self._extra]
        self._builder = RowBuilder(spec)  # templates, images, the kind: as a job's reader
        # embeddings: one request carries this many rows (a group), else one row
        self._per_request = inputs_per_request(kind_for(spec), spec)
        self._runner: RowRunner | None = None
        self._lock: asyncio.Lock | None = None
        self._halted: str | None = None

    async def _key(self) -> str | None:
        name = self._spec.endpoint.api_key_env
        if name is None:
            return None
        return os.environ.get(name) or await self._key_box[0]

    async def _setup(self) -> RowRunner:
        self._lock = self._lock or asyncio.Lock()
        async with self._lock:  # batches of one actor run side by side: build once
            if self._runner is None:
                spec, key = self._spec, await self._key()
                self._sem = asyncio.Semaphore(self._lanes)
                self._permits = PermitPool(self._lease, validity=SLOT_VALIDITY_S)
                self._loop = asyncio.get_running_loop()
                self._session = open_session(spec.endpoint, self._lanes)
                client = ApiClient(self._session, spec.endpoint, key, kind_for(spec),
                                   provider_for(spec))

                def on_trip(reason: str) -> None:  # a provider may echo the key
                    self._halted = redact(reason, key)
                    self._limiter.halt.remote(self._halted)

                # as a job's worker: a kind whose request carries several rows is grouped
                cls = GroupRunner if hasattr(kind_for(spec), "inputs_per_request") else RowRunner
                self._runner = cls(spec, client, self._permits, pause_all=self._pause_all,
                                         on_trip=on_trip, price=price_for(spec),
                                         budgeted=self._budgeted, structured=self._structured)
        return self._runner

    def __del__(self) -> None:
        """Ray Data drops the actor's UDF at the pipeline's end: close the session on its
        loop (Ray Data's thread), else aiohttp warns of an unclosed session."""
        if self._runner is not None and not self._loop.is_closed():
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(5)

    async def _lease(self, costs: list[Any], usd: list[float] | None,
                     settle: list[tuple[float, float]], spare: tuple[int, Any],
                     released: list[tuple[float, float]] | None = None) -> LeaseAnswer:
        try:  # the same call as a job's worker (online/worker.py), released output included
            return await asyncio.wait_for(
                self._limiter.lease.remote(costs, usd, settle, spare, released),
                LEASE_TIMEOUT_S)
        except TimeoutError:
            raise ClusterError(f"the rate limiter did not answer within {LEASE_TIMEOUT_S:.0f} s"
                               ) from None

    def _pause_all(self, seconds: float) -> None:
        self._permits.pause(seconds)
        self._limiter.pause.remote(seconds)  # the other actors learn at their next lease

    def _rows(self, batch: pa.Table) -> list[RequestRow]:
        """The batch's rows as requests, built by ``io.rows.RowBuilder`` (a row's own bad
        input, e.g. a template error or an unreadable image, is that row's error). The id
        is the row's position in the batch: it keys a group's answers, and is not output."""
        _check_columns(batch.column_names, self._spec, self._builder, self._extra)
        data = {c: batch.column(c).to_pylist() for c in self._builder.columns}
        return [RequestRow(str(j), *self._builder.payload(data, j))
                for j in range(batch.num_rows)]

    async def _one(self, runner: RowRunner, row: RequestRow) -> dict[str, Any] | None:
        async with self._sem:
            return await runner.run(row)

    async def _group(self, runner: GroupRunner, rows: list[RequestRow]
                     ) -> list[dict[str, Any] | None]:
        async with self._sem:
            return await runner.run_group(rows)

    async def _records(self, runner: RowRunner, rows: list[RequestRow]
                       ) -> list[dict[str, Any] | None]:
        if not isinstance(runner, GroupRunner):
            return list(await asyncio.gather(*(self._one(runner, r) for r in rows)))
        n = self._per_request  # the batch's rows in groups of n, one request each
        groups = await asyncio.gather(*(self._group(runner, rows[i:i + n])
                                        for i in range(0, len(rows), n)))
        return [rec for g in groups for rec in g]

    async def __call__(self, batch: pa.Table) -> pa.Table:
        runner = await self._setup()
        recs = await self._records(runner, self._rows(batch))
        await self._permits.flush()  # this batch's settlements reach the budget now
        if any(r is None for r in recs):  # the budget is spent, or the pipeline was halted
            halted = self._halted or await asyncio.wait_for(self._limiter.halted.remote(),
                                                            LEASE_TIMEOUT_S)
            if halted:
                raise JobCannotSucceed(f"batchrun stopped the pipeline: {halted}")
        filled = [r if r is not None else
                  {"status": "error", "error_type": "budget_exhausted", "attempts": 0,
                   "error_message": "the budget was spent before this row was sent"}
                  for r in recs]
        results = records_table(filled, pa.schema(self._fields))
        for f, col in zip(results.schema, results.columns):
            batch = batch.append_column(f, col)
        return batch


def _prepare(ds: Dataset, source: JobSpec | Mapping[str, Any] | str | Path
             ) -> tuple[JobSpec, str | None, Structured | None]:
    """Everything checked before the first request: spec, provider, price, key, columns."""
    spec = pipeline_spec(source)
    kind_for(spec), provider_for(spec)  # an unknown task or api is bad input
    price_for(spec)  # a model with no price (and no price: in the spec) is refused
    base = Path(source).parent if isinstance(source, str | Path) else Path.cwd()
    structured = Structured.from_spec(spec, base)
    builder = RowBuilder(spec)  # a template's syntax error is a spec error, here
    schema = ds.schema()  # runs the pipeline up to its first block, sends nothing
    _check_columns(list(schema.names) if schema is not None else None, spec, builder,
                   _extra_fields(spec, structured))
    return spec, resolve_api_key(spec, spec_path="ray_data.complete"), structured


def complete(ds: Dataset, spec: JobSpec | Mapping[str, Any] | str | Path, *,
             concurrency: int | tuple[int, int] = 2, batch_size: int = 128,
             num_cpus: float = 0.25) -> Dataset:
    """Add the model's answer to every row of ``ds``; returns the new (lazy) Dataset.

    ``spec``: a ``JobSpec``, a mapping of its fields or a YAML file (``input``/``output``
    not needed; see ``pipeline_spec``). The prompt comes from the spec's ``prompt_column``,
    ``messages_column`` or ``prompt_template`` (with ``system_prompt`` and
    ``image_column``, as in a job). Added columns: ``response``, ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens``, ``total_tokens``, ``cost_usd``,
    ``latency_ms``, ``wait_ms``, ``attempts``, ``status`` (ok/error), ``error_type``,
    ``error_message``; ``parsed`` with ``response_format``, ``embedding`` with
    ``task: embeddings`` (``embedding.inputs_per_request`` rows of a batch per request:
    make ``batch_size`` a multiple), Anthropic's cache-token columns with its API.

    ``concurrency``: the actor pool, Ray Data's own setting (n, or (min, max) to let it
    scale); ``limits.max_concurrency`` is split over the largest pool, so the requests
    in flight never exceed it. All actors share one limiter and one budget.

    Raises ``SpecError``/``SecretError``/``InputDataError`` (a missing prompt, template,
    image or id column, named) before any request is sent; a pipeline whose requests all
    fail the same job-wide way (401, 404, refused) fails with ``JobCannotSucceed`` from its actors.
    """
    from ray.data import ActorPoolStrategy

    spec, key, structured = _prepare(ds, spec)
    if not ray.is_initialized():
        ray.init()
    budget = config_for(spec)
    name = limiter_name(f"{spec.name}:ray-data-{secrets.token_hex(4)}")
    # The pool's actors hold the handle: the limiter lives as long as the pipeline's plan
    limiter = RateLimiter.options(name=name).remote(  # type: ignore[attr-defined]
        spec.name, spec.limits.rpm, spec.limits.tpm, budget,
        input_tpm=spec.limits.input_tpm, output_tpm=spec.limits.output_tpm)
    if budget is not None and budget.daily_usd is not None:
        # Unspent daily allowance goes back when the plan is dropped (the limiter's
        # __ray_shutdown__), else when this process exits: by name, as a handle kept
        # here would keep the limiter alive until then
        atexit.register(_close_limiter, name)
    # A reference inside a list: Ray passes the reference, not the key, to the actors
    key_box = [ray.put(key) if key else None]
    most = concurrency[1] if isinstance(concurrency, tuple) else concurrency
    lanes = max(1, min(split_concurrency(spec.limits.max_concurrency, most)))
    pool = (ActorPoolStrategy(min_size=concurrency[0], max_size=concurrency[1])
            if isinstance(concurrency, tuple) else ActorPoolStrategy(size=concurrency))
    return ds.map_batches(
        _Complete, batch_format="pyarrow", batch_size=batch_size, compute=pool,
        num_cpus=num_cpus, zero_copy_batch=True,
        fn_constructor_args=(spec, limiter, key_box, lanes, budget is not None, structured))


def _close_limiter(name: str) -> None:
    """Close a pipeline's limiter if it is still there (at this process's exit)."""
    if not ray.is_initialized():
        return
    with contextlib.suppress(ValueError, ray.exceptions.RayError, TimeoutError):  # gone
        ray.get(ray.get_actor(name).close.remote(), timeout=30)
