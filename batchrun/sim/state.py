"""The simulated provider's state, shared by its routes (``app.py``, ``batches.py``).

One ``MockState`` lives under ``app[STATE]``: config, limiter, ledger and the clock.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from aiohttp import web

from batchrun.sim.config import MockConfig
from batchrun.sim.ledger import Ledger
from batchrun.sim.limits import RateLimiter

__all__ = ["STATE", "MockState"]


class MockState:
    """Everything the handlers share: config, limiter, ledger and the server clock."""

    def __init__(self, config: MockConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.clock = clock
        self.t0 = clock()
        self.limiter = RateLimiter(config.rpm, config.tpm, strict=config.strict)
        self.ledger = Ledger(config.ledger_file)
        self.auth = f"Bearer {config.api_key}" if config.api_key else None
        self.unknown_models = frozenset(config.unknown_models)
        # Distinguishes completion ids of different server runs and ledger resets.
        self.nonce = os.urandom(4).hex()
        self.on_reset: list[Callable[[], None]] = []  # other routes' state (Anthropic's limits)

    def now(self) -> float:
        """Seconds since the server started (the ledger's and the limiter's time)."""
        return self.clock() - self.t0

    def reset(self) -> None:
        """Forget all requests: ledger, limit windows and sequence numbers."""
        self.ledger.clear()
        self.limiter.clear()
        for clear in self.on_reset:
            clear()
        self.nonce = os.urandom(4).hex()


STATE = web.AppKey("batchrun_mock_state", MockState)
