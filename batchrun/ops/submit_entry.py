"""The entrypoint of a submitted job: ``python -m batchrun.ops.submit_entry job.yaml [--ds D]``.

It runs as the Ray job's driver, in the unpacked ``working_dir`` (see ``submit.py``).
Before anything else it moves the API key from the package's key file into this
process's environment and deletes the file, so the key lives on the node only in
this process (and the object store, for the workers) for the job's lifetime.
Exit codes are ``batchrun run``'s: the job server reports non-zero as FAILED.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from batchrun.errors import BatchrunError
from batchrun.ops.submit import KEY_FILE
from batchrun.spec import load_spec

__all__ = ["load_key", "main", "parser"]


def load_key(spec_path: str) -> bool:
    """Move the key file next to the spec into ``os.environ``; True when there was one."""
    path = Path(spec_path).parent / KEY_FILE
    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        return False  # no key needed, or the cluster's environment provides it
    finally:
        path.unlink(missing_ok=True)  # read once: never left on the node's disk
    name = load_spec(spec_path).endpoint.api_key_env
    if name and key:
        os.environ[name] = key
    return bool(key)


def parser() -> argparse.ArgumentParser:
    """The entrypoint's flags: those of ``batchrun run`` that make sense on a cluster."""
    p = argparse.ArgumentParser(prog="batchrun.ops.submit_entry")
    p.add_argument("spec")
    p.add_argument("--ds", default=None)
    p.add_argument("--retry-errors", action="store_true")
    p.add_argument("--force", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from batchrun.io.summary import exit_code
    from batchrun.runner import RunOptions, run_job

    try:
        load_key(args.spec)
        summary = run_job(args.spec, RunOptions(ds=args.ds, retry_errors=args.retry_errors,
                                                force=args.force, progress=False))
    except BatchrunError as e:
        print(f"batchrun: error: {e}", file=sys.stderr, flush=True)
        return int(getattr(e, "exit_code", 1))
    print(json.dumps(summary.model_dump(mode="json"), indent=2), flush=True)
    return exit_code(summary)  # row errors (6), budget (4): the job server reports FAILED


if __name__ == "__main__":
    sys.exit(main())
