"""The batch-mode state file: which chunk of the job is at which step, on disk, atomically.

``OUTPUT/batch/state.json`` is rewritten (temp file, fsync, rename) before and after
every step a chunk takes with the provider::

    written -> uploaded (file_id) -> created (batch_id) -> completed -> collected

so a driver killed at any point can be rerun: it uploads again what was only
written, looks up by metadata a batch created but not yet recorded, and polls
what was created. A chunk names its rows as ``[start, stop)`` position ranges
inside shards (not as ids), which keeps the file small for millions of rows.

The state is not the judge of what is done: the results on disk are, for both modes
(``OUTPUT/job.json`` and ``resume.check_fingerprint`` decide whether they may be
resumed). The state only says which rows are with the provider, so that online mode
can refuse to send rows an open batch will also answer (and bill).

The API key is never part of this state.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from batchrun.errors import OutputError, ResumeRefused
from batchrun.io import storage
from batchrun.io.conditional import conditional_for
from batchrun.io.resume import Fingerprint
from batchrun.spec import JobSpec

__all__ = [
    "OPEN_STEPS",
    "PAID_STEPS",
    "UNSENT_STEPS",
    "BatchJobState",
    "ChunkState",
    "Ranges",
    "StateFile",
    "Step",
    "batch_tag",
    "chunk_path",
    "count_rows",
    "fingerprint_sha",
    "refuse_open_batches",
    "to_ranges",
]

Step = Literal["written", "uploaded", "created", "completed", "collected"]
OPEN_STEPS: tuple[str, ...] = ("written", "uploaded", "created", "completed")
UNSENT_STEPS: tuple[str, ...] = ("written", "uploaded")  # no batch recorded yet
PAID_STEPS: tuple[str, ...] = ("created", "completed")  # a batch exists, not yet collected
# Row positions of one chunk: shard index -> sorted, disjoint [start, stop) ranges,
# positions counted from the shard's first row.
Ranges = dict[int, list[tuple[int, int]]]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChunkState(_Strict):
    seq: int = Field(description="Chunk number in this job; names the JSONL file and metadata.")
    attempt: int = Field(default=1, ge=1, description="Batch attempt of these rows (1 = first).")
    step: Step = Field(default="written", description="Last step completed with the provider.")
    rows: Ranges = Field(description="The chunk's rows as position ranges per shard index.")
    n_rows: int = Field(description="Rows covered, bad rows included.")
    n_requests: int = Field(description="Request lines in the JSONL file.")
    n_tokens: int = Field(default=0, description="Prompt tokens of its requests (estimated), "
                          "counted against batch.max_enqueued_tokens (0: not counted).")
    not_before: float | None = Field(default=None, description="Epoch s: the provider's "
                                     "queue refused it; not created again before this.")
    refused_ids: list[str] = Field(default_factory=list, description="Batches the provider "
                                   "refused for its queue quota (never adopted).")
    refusals: int = Field(default=0, description="Queue-quota refusals so far (the wait "
                          "before the next create doubles with each).")
    worst_usd: float = Field(default=0.0, description="Worst-case cost at the batch price.")
    file: str = Field(description="JSONL file name inside OUTPUT/batch/.")
    file_id: str | None = Field(default=None, description="Provider's id of the uploaded file.")
    batch_id: str | None = Field(default=None, description="Provider's batch id.")
    batch_status: str | None = Field(default=None, description="Provider's last seen batch status.")
    created_at: float | None = Field(default=None, description="Epoch s of the batch creation.")
    intent_at: float | None = Field(default=None, description="Epoch s just before the last "
                                    "create call: a batch made after it may be this chunk's "
                                    "(providers without metadata: Anthropic).")
    redo: bool = Field(default=False, description="--retry-errors: rows that hold an error "
                       "result on purpose (only an ok result makes them done).")


class BatchJobState(_Strict):
    job: str = Field(description="Job name.")
    fingerprint: str = Field(description="Tag written into each batch's metadata, to find a "
                             "batch created but not recorded (fixed for the folder's life).")
    job_sha256: str | None = Field(
        default=None, description="fingerprint_sha of OUTPUT/job.json when the unsent chunks "
        "were written (None: unknown, e.g. a state from an older batchrun).")
    planned: bool = Field(default=False, description="Unused: read so that state files of "
                          "older batchrun load (every run plans the rows without a result).")
    next_seq: int = Field(default=0, description="Number of the next chunk.")
    chunks: list[ChunkState] = Field(default_factory=list)
    fallback: Ranges = Field(
        default_factory=dict, description="Rows left for the online path (fallback: online)."
    )


def fingerprint_sha(fp: Fingerprint) -> str:
    """A digest of the job's resume fingerprint: inputs (by content) and request fields."""
    return hashlib.sha256(fp.model_dump_json().encode()).hexdigest()[:32]


def batch_tag(fp: Fingerprint, output: str | Path) -> str:
    """The metadata tag of a new state: the job and its output folder, so that two
    folders running the same job never adopt each other's batches (a store URI as it
    is: a rerun from another machine or folder must find the same tag)."""
    where = str(output).rstrip("/") if "://" in str(output) else Path(output).resolve()
    blob = f"{fingerprint_sha(fp)}:{where}"
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def to_ranges(positions: list[int]) -> list[tuple[int, int]]:
    """Sorted positions as [start, stop) runs: retries of scattered rows stay compact."""
    out: list[tuple[int, int]] = []
    for p in sorted(positions):
        if out and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1)
        else:
            out.append((p, p + 1))
    return out


def count_rows(ranges: Ranges) -> int:
    return sum(b - a for runs in ranges.values() for a, b in runs)


def chunk_path(folder: str | Path, name: str) -> str | Path:
    """A chunk file's place: ``folder/name`` on disk, or the object's URI in a store."""
    return storage.join(str(folder), name) if "://" in str(folder) else Path(folder) / name


class StateFile:
    """``OUTPUT/batch/state.json`` of one job.

    In an object store two drivers of the same output could race (a rerun while a
    crashed one's cluster still runs): each save there is a conditional write against
    the version this driver last read or wrote, so the loser stops with one line
    instead of overwriting the winner's record of created (paid) batches."""

    def __init__(self, output: str | Path):
        store = "://" in str(output)
        # the chunk files' folder: local, or the store prefix they are committed under
        self.dir: str | Path = (storage.join(str(output), "batch") if store
                                else Path(output) / "batch")
        self.path: str | Path = chunk_path(self.dir, "state.json")
        self._version: str | None = None  # store only: the object's version last seen
        self._store = store

    def load(self, spec: JobSpec, tag: str = "") -> BatchJobState:
        """The saved state, or a fresh one tagged ``tag``. Whether the results may be
        resumed is ``resume.check_fingerprint``'s call (honouring --force), not this one's."""
        try:
            state = BatchJobState.model_validate_json(self._read())
        except FileNotFoundError:
            return BatchJobState(job=spec.name, fingerprint=tag)
        except (OSError, ValidationError) as e:
            reason = storage.reason(e) if isinstance(e, OSError) else "not a batch state file"
            raise ResumeRefused(
                f"output: {self.path} is unreadable ({reason}); restore it, or delete "
                f"{self.dir} to start the batches over (batches still open would be paid "
                "again)") from None
        if state.job != spec.name:
            raise ResumeRefused(
                f"output: {self.dir} holds batch state of job {state.job}, not {spec.name}; "
                f"use a new output folder or delete {self.dir}")
        return state

    def _read(self) -> bytes:
        if not self._store:
            return storage.read_bytes(self.path)
        cond, path = conditional_for(str(self.path))
        got = cond.read_with_version(path)
        if got is None:
            raise FileNotFoundError(str(self.path))
        data, self._version = got
        return data

    def save(self, state: BatchJobState) -> None:
        data = state.model_dump_json(indent=1).encode()
        if not self._store:
            storage.commit_bytes(self.path, data)  # atomic
            return
        try:
            cond, path = conditional_for(str(self.path))
            ok = (cond.put_if_absent(path, data) if self._version is None
                  else cond.put_if_version(path, data, self._version))
            got = cond.read_with_version(path) if ok else None
        except OSError as e:
            raise storage.output_error(str(self.path), e) from None
        if got is None or got[0] != data:
            raise OutputError(
                f"output: {self.path} was changed by another driver of this job while this "
                "one ran; stop the other driver, then run the same command again")
        self._version = got[1]


def refuse_open_batches(spec: JobSpec) -> None:
    """Online mode must not send rows that an open batch will also answer, and bill. A
    chunk at ``uploaded`` may have one: a batch run stopped between the create call and
    recording its answer, and only the provider knows (a batch run asks it)."""
    sf = StateFile(spec.output)
    if not storage.exists(sf.path):
        return
    chunks = sf.load(spec).chunks
    n = sum(1 for c in chunks if c.step in PAID_STEPS)
    if n:
        raise ResumeRefused(
            f"output: {spec.output}: {n} batch(es) of this job are still open with the "
            "provider and their rows are paid for; collect them first with --mode batch "
            "(or cancel them with `batchrun stop`, then collect with --mode batch), then run "
            "online to finish the rest")
    maybe = sum(1 for c in chunks if c.step == "uploaded")
    if maybe:
        raise ResumeRefused(
            f"output: {spec.output}: {maybe} chunk(s) of this job may be open batches with "
            "the provider (a batch run stopped while creating them); run --mode batch once "
            "to adopt or clear them, then run online to finish the rest")
