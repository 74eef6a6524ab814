"""The Python API behind ``import batchrun``: the CLI's jobs as calls that return values.

``run`` is the code path of ``batchrun run`` (the CLI calls it), ``estimate`` the figures
of ``batchrun estimate``; both take a ``JobSpec`` or the path of a spec file. Errors are
the one tree of ``batchrun.errors``, each with a one-line message: a bad spec is a
``SpecError``, an unset key a ``SecretError``, a lost cluster a ``ClusterError``; row
errors are not exceptions but figures of the returned ``Summary``.
"""

from __future__ import annotations

import os
from typing import Literal

import pyarrow as pa

from batchrun.api.records import result_schema
from batchrun.errors import BatchrunError
from batchrun.io import stores
from batchrun.io.storage import read_table
from batchrun.io.summary import Summary
from batchrun.io.writer import ResultsStore
from batchrun.money.estimate import DEFAULT_EXPECTED_OUTPUT_RATIO, Estimate, estimate_job
from batchrun.runner import RunOptions, run_job
from batchrun.spec import JobSpec, load_spec

__all__ = ["SpecSource", "estimate", "read_results", "run"]

SpecSource = JobSpec | str | os.PathLike[str]


def _local(path: str) -> str:
    """A relative local path of a spec built in Python is taken from the current folder
    (Ray's workers run elsewhere); URIs are left alone."""
    return path if "://" in path else os.path.abspath(path)


def _spec(source: SpecSource, ds: str | None) -> tuple[str, JobSpec]:
    """(the name messages give the spec, the spec): a file is read as the CLI reads it."""
    if isinstance(source, JobSpec):
        spec = source.model_copy(update={"input": _local(source.input),
                                         "output": _local(source.output)})
        return f"JobSpec {spec.name!r}", spec.with_date(ds) if ds else spec
    return os.fspath(source), load_spec(os.fspath(source), ds=ds)


def _clean(e: BatchrunError) -> BatchrunError:
    """The error itself, without Ray's wrapping (a task error carries a remote traceback
    in its message): the caller sees the one line batchrun wrote."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BatchrunError) and cause is not e else e


def run(spec: SpecSource, *, address: str | None = None, progress: bool = False,
        retry_errors: bool = False, force: bool = False,
        mode: Literal["online", "batch"] | None = None, wait: bool = True,
        ds: str | None = None, limit: int | None = None,
        include_dashboard: bool | None = None) -> Summary:
    """Run (or resume) a job, exactly as ``batchrun run`` does; returns its ``Summary``.

    ``spec``: a ``JobSpec`` or the path of a spec file. ``address``: the Ray cluster to
    join (else RAY_ADDRESS, else a local Ray started for this job and stopped after it).
    In a process where Ray is already initialised, the job runs on that Ray and leaves
    it running. What the CLI says with an exit code after a finished run is in the
    summary: rows in error (``errors``, ``errors_by_type``; exit 6), a spent budget
    (``budget_exhausted``, ``unsent``; exit 4), batches still open (``pending_batches``;
    exit 10). A job stopped early raises ``JobCannotSucceed`` (or ``BudgetExhausted``
    where a mode stops at once), a lost cluster ``ClusterError``, bad input a ``UserError``.
    """
    opts = RunOptions(address=address, retry_errors=retry_errors, force=force, mode=mode,
                      wait=wait, ds=ds, progress=progress, include_dashboard=include_dashboard,
                      limit=limit)
    try:
        if isinstance(spec, JobSpec):
            name, given = _spec(spec, ds)
            return run_job(name, opts, spec=given)
        return run_job(os.fspath(spec), opts)
    except BatchrunError as e:
        raise _clean(e) from None


def estimate(spec: SpecSource, *, sample_rows: int | Literal["auto"] | None = "auto",
             expected_output_ratio: float = DEFAULT_EXPECTED_OUTPUT_RATIO,
             ds: str | None = None) -> Estimate:
    """Rows, tokens, worst-case and expected cost, duration: ``batchrun estimate``'s
    figures, computed from the input without sending anything.

    ``sample_rows``: "auto" is the CLI's rule (exact up to 200,000 rows, a sample
    above); None counts every row; a number samples that many.
    """
    _, job = _spec(spec, ds)
    est, _, _ = estimate_job(job, False, sample_rows, expected_output_ratio)
    return est


def read_results(spec: SpecSource, *, ds: str | None = None) -> pa.Table:
    """The job's committed results (the final file of every finished shard), as one
    ``pyarrow.Table``; empty, with the result columns, before any shard finished.
    Rows of a run still in progress (its checkpoint parts) are not included."""
    _, job = _spec(spec, ds)
    job = stores.prepare(job)  # an output in a store: the spec's endpoint and region
    store = ResultsStore(job.output, result_schema())
    files = sorted(store.result_files())
    if not files:
        return result_schema().empty_table()
    tables = [read_table(f, fs=store.fs) for f in files]
    return pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)

