"""The simulated provider a job's ``simulate:`` block asks for, started for one run.

The job gets a copy of its spec pointing at the simulator, and a throwaway key under its
``api_key_env`` (restored afterwards: a Python caller's process goes on)."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator

from batchrun.spec import JobSpec

__all__ = ["simulated_provider"]


@contextlib.contextmanager
def simulated_provider(spec: JobSpec) -> Iterator[JobSpec]:
    """Start the built-in provider when the spec asks for it; yield the spec pointing at it."""
    if spec.simulate is None:
        yield spec
        return
    from batchrun.sim.config import MockConfig  # only a simulated job loads the simulator
    from batchrun.sim.run import start_subprocess

    key = None
    env = spec.endpoint.api_key_env
    before = os.environ.get(env) if env else None
    if env:
        # always a throwaway key: a real one exported under this name must never reach
        # the simulator (or a simulated job's files)
        key = "sim-" + secrets.token_hex(16)
        os.environ[env] = key
    sim = spec.simulate.model_dump()
    sim.update({k: sim[k] or 0 for k in ("rpm", "tpm", "input_tpm", "output_tpm")})  # None: 0
    cfg = MockConfig(**sim, api_key=key)
    proc = start_subprocess(cfg)
    try:
        endpoint = spec.endpoint.model_copy(update={"base_url": proc.base_url})
        yield spec.model_copy(update={"endpoint": endpoint})
    finally:
        proc.terminate()
        if env:  # a Python caller's process goes on: give it back its own variable
            if before is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = before
