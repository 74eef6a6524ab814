"""What makes a resume safe: the job's fingerprint, and unique row ids.

``OUTPUT/job.json`` records the input files (name relative to the input root, size,
rows, a hash of the Parquet footer: content and schema, never mtimes) and a hash of
every spec field that shapes a request (model, messages, generation, structured
output). A rerun into the same folder with different inputs or request fields is
refused, because its "already answered" rows would be answers to other questions;
``--force`` accepts the change. The same files read from another place (a moved
checkout, another machine's mount) are the same input; names matter only relative to
the root, because default row ids are made of them. Online and batch mode both check
here. A ``job.json`` of an older batchrun names its inputs by the path the spec gave
(often absolute): such a name matches when it ends with the relative one.

Duplicate ids are found before any request is sent: a duplicated id would be
answered twice and written once. The check streams the id column, keeps one
64-bit hash per row (80 MB for 10M rows, never the strings), and confirms the
colliding hashes with a second exact pass.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from batchrun.errors import InputDataError, ResumeRefused
from batchrun.io import storage
from batchrun.io.formats import content_sha256, is_row_file, open_input, row_stream
from batchrun.io.shards import input_root
from batchrun.io.storage import commit_bytes, join
from batchrun.spec import JobSpec

__all__ = ["Fingerprint", "check_fingerprint", "find_duplicate_ids", "fingerprint",
           "refuse_duplicates"]

_REQUEST_FIELDS = ("model", "prompt_column", "messages_column", "system_prompt", "id_column",
                   "generation", "response_format", "carry_columns")  # not mode: same answers


class InputFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="File path relative to the input root ('as_given' "
                      "fingerprints: as the spec resolved it).")
    size: int = Field(description="Bytes.")
    rows: int = Field(description="Rows per the Parquet footer.")
    footer_sha256: str = Field(description="Hash of the footer: schema, row groups, statistics.")


class Fingerprint(BaseModel):
    """``OUTPUT/job.json``: what this output folder holds answers to."""

    model_config = ConfigDict(extra="forbid")
    job: str = Field(description="Job name.")
    inputs: list[InputFile] = Field(description="The input files.")
    request_sha256: str = Field(description="Hash of the request-shaping spec fields.")
    request_fields: dict[str, Any] = Field(description="Those fields, for a readable diff.")
    names: Literal["relative", "as_given"] = Field(
        "as_given", description="How inputs name their files: relative to the input root, "
        "or (job.json of an older batchrun) the path as the spec gave it.")


def _footer_hash(path: str) -> tuple[int, str]:
    if is_row_file(path):  # JSONL/CSV: no footer; the content stands for it
        return open_input(path).metadata.num_rows, content_sha256(row_stream(path))
    meta = storage.read_footer(path)
    digest = hashlib.sha256(meta.schema.to_arrow_schema().serialize().to_pybytes())
    for i in range(meta.num_row_groups):
        rg = meta.row_group(i)
        digest.update(f"{rg.num_rows}:{rg.total_byte_size}".encode())
        for c in range(rg.num_columns):
            col = rg.column(c)
            digest.update(f"{col.file_offset}:{col.total_compressed_size}".encode())
    return meta.num_rows, digest.hexdigest()


def fingerprint(spec: JobSpec, files: list[str],
                schema: dict[str, Any] | None = None) -> Fingerprint:
    inputs, root = [], input_root(spec)
    for f in files:
        rows, sha = _footer_hash(f)
        inputs.append(InputFile(name=storage.relative(f, root),
                                size=storage.size(f), rows=rows, footer_sha256=sha))
    fields = spec.model_dump(include=set(_REQUEST_FIELDS), mode="json")
    if spec.task != "chat":  # other kinds ask other questions; chat outputs keep their hash
        fields["task"] = spec.task
    if spec.task == "embeddings":
        fields["embedding"] = spec.embedding.model_dump(mode="json")
    for name in ("prompt_template", "image_column"):  # only when set: old hashes hold
        if getattr(spec, name) is not None:
            fields[name] = getattr(spec, name)
    if schema is not None:  # the resolved schema: an edited schema file or model counts
        fields["resolved_schema"] = schema
    sha = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return Fingerprint(job=spec.name, inputs=inputs, request_sha256=sha, request_fields=fields,
                       names="relative")


def _difference(old: Fingerprint, new: Fingerprint) -> str | None:
    if old.request_sha256 != new.request_sha256:
        changed = [k for k in (*_REQUEST_FIELDS, "resolved_schema", "task", "embedding",
                               "prompt_template", "image_column")
                   if old.request_fields.get(k) != new.request_fields.get(k)]
        return f"request fields changed ({', '.join(changed)})"
    if len(old.inputs) != len(new.inputs) or not all(
            _same_name(a.name, b.name, old.names) for a, b in zip(old.inputs, new.inputs)):
        return "the set of input files changed"
    for a, b in zip(old.inputs, new.inputs):
        if (a.size, a.rows, a.footer_sha256) != (b.size, b.rows, b.footer_sha256):
            return f"input {b.name} changed (size, rows or content)"
    return None


def _same_name(old: str, relative: str, names: str) -> bool:
    """Whether a recorded name is the file now named ``relative`` to the input root: the
    same relative name, or an older record's path (absolute, or relative to the old
    working folder) ending with it: the same files under a root that moved."""
    if names == "relative":
        return old == relative
    want = Path(relative).parts
    return Path(old).parts[-len(want):] == want


def check_fingerprint(spec: JobSpec, files: list[str], *, force: bool,
                      schema: dict[str, Any] | None = None) -> Fingerprint:
    """Record the fingerprint, or refuse a resume whose inputs or request fields differ."""
    path = join(spec.output, "job.json")
    new = fingerprint(spec, files, schema)
    if not force and storage.exists(path):
        try:
            old = Fingerprint.model_validate_json(storage.read_bytes(path))
        except (OSError, ValueError):
            old = None  # unreadable: treat as a different job
        why = "job.json is unreadable" if old is None else _difference(old, new)
        if why:
            raise ResumeRefused(
                f"{spec.output}: holds results of a different job run: {why}; use another "
                "output folder, or --force to keep the old results and continue")
    commit_bytes(path, new.model_dump_json(indent=2).encode())
    return new


def _hashes(files: list[str], column: str) -> np.ndarray:
    parts = []
    for f in files:
        for batch in open_input(f).iter_batches(batch_size=65536, columns=[column]):
            parts.append(np.fromiter((hash(str(v)) for v in batch.column(0).to_pylist()),
                                     dtype=np.int64, count=batch.num_rows))
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def find_duplicate_ids(files: list[str], column: str, limit: int = 5) -> list[str]:
    """The first ``limit`` ids that occur more than once, in input order."""
    h = np.sort(_hashes(files, column))
    suspects = set(h[1:][h[1:] == h[:-1]].tolist())
    if not suspects:
        return []
    seen: set[str] = set()
    dups: list[str] = []
    for f in files:
        for batch in open_input(f).iter_batches(batch_size=65536, columns=[column]):
            for v in batch.column(0).to_pylist():
                s = str(v)
                if hash(s) not in suspects:
                    continue
                if s in seen and s not in dups:
                    dups.append(s)
                    if len(dups) >= limit:
                        return dups
                seen.add(s)
    return dups


def refuse_duplicates(spec: JobSpec, files: list[str]) -> None:
    if spec.id_column is None:
        return  # default ids are file + row position: unique by construction
    dups = find_duplicate_ids(files, spec.id_column)
    if dups:
        raise InputDataError(
            f"input: column {spec.id_column!r} has duplicate ids (first: {', '.join(dups)}); "
            "ids must be unique, or drop id_column to use file + row position")
