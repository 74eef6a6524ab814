"""The batch-mode state file: which chunk of the job is at which step, on disk, atomically.

``OUTPUT/batch/state.json`` is rewritten (temp file, fsync, rename) before and after
every step a chunk takes with the provider::

    written -> uploaded (file_id) -> created (batch_id) -> completed -> collected

so a driver killed at any point can be rerun: it uploads again what was only
written, looks up by metadata a batch created but not yet recorded, and polls
what was created. A chunk names its rows as ``[start, stop)`` position ranges
inside shards (not as ids), which keeps the file small for millions of rows.

The API key is never part of this state.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from batchrun.errors import OutputError, ResumeRefused
from batchrun.shards import input_files
from batchrun.spec import JobSpec

__all__ = [
    "OPEN_STEPS",
    "BatchJobState",
    "ChunkState",
    "Ranges",
    "StateFile",
    "Step",
    "atomic_write_bytes",
    "count_rows",
    "spec_fingerprint",
    "to_ranges",
]

Step = Literal["written", "uploaded", "created", "completed", "collected"]
OPEN_STEPS: tuple[str, ...] = ("written", "uploaded", "created", "completed")
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
    worst_usd: float = Field(default=0.0, description="Worst-case cost at the batch price.")
    file: str = Field(description="JSONL file name inside OUTPUT/batch/.")
    file_id: str | None = Field(default=None, description="Provider's id of the uploaded file.")
    batch_id: str | None = Field(default=None, description="Provider's batch id.")
    batch_status: str | None = Field(default=None, description="Provider's last seen batch status.")
    created_at: float | None = Field(default=None, description="Epoch s of the batch creation.")


class BatchJobState(_Strict):
    job: str = Field(description="Job name.")
    fingerprint: str = Field(description="spec_fingerprint of the spec that made the chunks.")
    planned: bool = Field(default=False, description="Every input row is in some chunk.")
    next_seq: int = Field(default=0, description="Number of the next chunk.")
    chunks: list[ChunkState] = Field(default_factory=list)
    fallback: Ranges = Field(
        default_factory=dict, description="Rows left for the online path (fallback: online)."
    )


def spec_fingerprint(spec: JobSpec) -> str:
    """sha256 of what shapes the requests: model, generation, prompts, input files."""
    files = []
    for path in input_files(spec):
        st = os.stat(path)
        files.append([os.path.basename(path), st.st_size, st.st_mtime_ns])
    doc = {
        "model": spec.model,
        "generation": spec.generation.model_dump(mode="json"),
        "system_prompt": spec.system_prompt,
        "prompt_column": spec.prompt_column,
        "messages_column": spec.messages_column,
        "id_column": spec.id_column,
        "shard_rows": spec.shard_rows,
        "response_format": spec.response_format.model_dump(mode="json")
        if spec.response_format else None,
        "files": files,
    }
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old or the new file, never a mix."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OutputError(f"output: cannot write {path} ({e.strerror or e}); fix the folder's "
                          "permissions or free space and run the same command again") from e


class StateFile:
    """``OUTPUT/batch/state.json`` of one job."""

    def __init__(self, output: str | Path):
        self.dir = Path(output) / "batch"
        self.path = self.dir / "state.json"

    def load(self, spec: JobSpec, fingerprint: str) -> BatchJobState:
        """The saved state, or a fresh one; refuses state written for other inputs."""
        if not self.path.exists():
            return BatchJobState(job=spec.name, fingerprint=fingerprint)
        state = BatchJobState.model_validate_json(self.path.read_bytes())
        if state.fingerprint != fingerprint or state.job != spec.name:
            raise ResumeRefused(
                f"output: {self.dir} holds batch state of another job or other inputs "
                f"(job {state.job}); use a new output folder or delete {self.dir}"
            )
        return state

    def save(self, state: BatchJobState) -> None:
        atomic_write_bytes(self.path, state.model_dump_json(indent=1).encode())
