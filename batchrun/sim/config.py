"""Settings of the simulated provider, and their round trip through command-line flags.

Every field carries its flag in ``metadata`` so that the argparse parser (``add_arguments``)
and the reverse direction (``MockConfig.to_argv``, used to spawn the server as a
subprocess) are generated from one table and cannot drift apart.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["API_KEY_ENV", "DEFAULT_MODELS", "DEFAULT_OVERSIZE_BYTES", "MockConfig", "add_arguments"]

DEFAULT_MODELS: tuple[str, ...] = ("gpt-4.1-mini", "gpt-4.1", "gpt-4o-mini")
DEFAULT_OVERSIZE_BYTES = 8 * 1024 * 1024

API_KEY_ENV = "BATCHRUN_MOCK_API_KEY"
_RATE_FIELDS = ("fail_rate", "reset_rate", "malformed_rate", "nonjson_rate", "oversize_rate")


def _opt(flag: str, help_: str, default: Any) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help_})


@dataclass(frozen=True)
class MockConfig:
    """What the simulated provider enforces and which faults it injects (all off by default).

    ``rpm``/``tpm`` of 0 mean unlimited. Fault rates are fractions of the requests that
    pass the rate limiter; their sum must not exceed 1.
    """

    rpm: int = _opt("--rpm", "requests per minute (0: unlimited)", 0)
    tpm: int = _opt("--tpm", "tokens per minute, prompt + max_tokens (0: unlimited)", 0)
    input_tpm: int = _opt("--input-tpm", "Anthropic: input tokens per minute (0: unlimited)", 0)
    output_tpm: int = _opt("--output-tpm", "Anthropic: output tokens per minute, max_tokens "
                           "checked, the actual count kept (0: unlimited)", 0)
    overload_rate: float = _opt("--overload-rate", "Anthropic: share answered 529 "
                                "overloaded_error", 0.0)
    strict: bool = _opt("--no-strict", "use only the 60 s window, not also RPM/6 per 10 s", True)
    latency_ms: float = _opt("--latency-ms", "delay before each accepted answer", 0.0)
    latency_jitter_ms: float = _opt("--latency-jitter-ms", "extra uniform delay 0..J ms", 0.0)
    fail_rate: float = _opt("--fail-rate", "share answered 500/502/503", 0.0)
    reset_rate: float = _opt("--reset-rate", "share whose connection is reset", 0.0)
    malformed_rate: float = _opt("--malformed-rate", "share answered 200 with bad JSON", 0.0)
    nonjson_rate: float = _opt("--nonjson-rate", "share answered 502 text/html", 0.0)
    oversize_rate: float = _opt("--oversize-rate", "share answered with a huge 200 body", 0.0)
    oversize_bytes: int = _opt("--oversize-bytes", "minimum size of an oversize body",
                                 DEFAULT_OVERSIZE_BYTES)
    storm_every: float = _opt("--storm-every", "seconds between 429 storms (0: none)", 0.0)
    storm_seconds: float = _opt("--storm-seconds", "length of each 429 storm", 0.0)
    # Structured outputs (response_format json_schema): shares of the 200 answers whose
    # content is spoiled, independent of the transport faults above.
    invalid_json_rate: float = _opt("--invalid-json-rate", "share of json_schema answers "
                                    "invalid: half not JSON, half breaking the schema", 0.0)
    truncate_rate: float = _opt("--truncate-rate", "share of json_schema answers cut off "
                                "with finish_reason length", 0.0)
    # Batch API (batches.py): time from validating to completed, per-line errors, and
    # every Nth created batch failed or expired, to exercise the client's retries.
    batch_delay_s: float = _opt("--batch-delay-s", "seconds a batch takes to complete", 1.0)
    batch_line_error_rate: float = _opt("--batch-line-error-rate",
                                        "share of batch lines answered with an error", 0.0)
    batch_fail_every: int = _opt("--batch-fail-every",
                                 "every Nth created batch fails (0: none)", 0)
    batch_expire_every: int = _opt("--batch-expire-every",
                                   "every Nth created batch expires half done (0: none)", 0)
    # A proxy's key limit on the Files/Batch API: 429 + Retry-After on the first K calls.
    batch_429_first: int = _opt("--batch-429-first", "answer the first K Files/Batch API "
                                "calls 429 (0: none)", 0)
    batch_retry_after_s: float = _opt("--batch-retry-after", "Retry-After seconds of those "
                                      "429s", 1.0)
    # Batch queue quotas: what open batches may hold before a create is refused.
    batch_queue_tokens: int = _opt("--batch-queue-tokens", "OpenAI: enqueued tokens per "
                                   "model; a batch beyond fails token_limit_exceeded (0: none)",
                                   0)
    batch_queue_requests: int = _opt("--batch-queue-requests", "Anthropic: requests in open "
                                     "message batches; a create beyond is 429 (0: none)", 0)
    api_key: str | None = _opt("--api-key", "required bearer key (default: none)", None)
    # A careless proxy that quotes the caller's key in its errors: the client must mask it.
    echo_key_in_errors: float = _opt("--echo-key-in-errors", "share answered 400 with a body "
                                     "quoting the bearer key (also quoted in 401s when > 0)",
                                     0.0)
    seed: int = _opt("--seed", "seed of the deterministic fault draw", 0)
    models: tuple[str, ...] = _opt("--model", "model listed by /v1/models (repeatable)",
                                   DEFAULT_MODELS)
    unknown_models: tuple[str, ...] = _opt("--unknown-model", "model answered 404 (repeatable)",
                                           ())
    ledger_file: str | None = _opt("--ledger-file", "append ledger records as JSON lines", None)

    def __post_init__(self) -> None:
        # Lists given by callers become tuples so the config stays hashable and frozen.
        for name in ("models", "unknown_models"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        self._validate()

    def _validate(self) -> None:
        if min(self.rpm, self.tpm, self.input_tpm, self.output_tpm) < 0:
            raise ValueError("rpm, tpm, input_tpm and output_tpm must be >= 0")
        if not 0.0 <= self.overload_rate <= 1.0:
            raise ValueError("overload_rate must lie in [0, 1]")
        rates = [getattr(self, name) for name in _RATE_FIELDS]
        if any(not 0.0 <= r <= 1.0 for r in rates) or sum(rates) > 1.0 + 1e-9:
            raise ValueError("fault rates must lie in [0, 1] and sum to at most 1")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0 or self.oversize_bytes < 0:
            raise ValueError("latency and oversize_bytes must be >= 0")
        if self.storm_every < 0 or self.storm_seconds < 0:
            raise ValueError("storm_every and storm_seconds must be >= 0")
        if self.storm_every and self.storm_seconds >= self.storm_every:
            raise ValueError("storm_seconds must be shorter than storm_every")
        if not 0.0 <= self.batch_line_error_rate <= 1.0 or self.batch_delay_s < 0:
            raise ValueError("batch_line_error_rate must lie in [0, 1], batch_delay_s >= 0")
        if self.batch_fail_every < 0 or self.batch_expire_every < 0:
            raise ValueError("batch_fail_every and batch_expire_every must be >= 0")
        if self.batch_429_first < 0 or self.batch_retry_after_s < 0:
            raise ValueError("batch_429_first and batch_retry_after_s must be >= 0")
        if not 0.0 <= self.echo_key_in_errors <= 1.0:
            raise ValueError("echo_key_in_errors must lie in [0, 1]")
        answer_rates = (self.invalid_json_rate, self.truncate_rate)
        if any(not 0.0 <= r <= 1.0 for r in answer_rates) or sum(answer_rates) > 1.0 + 1e-9:
            raise ValueError("invalid_json_rate and truncate_rate must lie in [0, 1], sum <= 1")

    @property
    def any_faults(self) -> bool:
        """Whether the fault draw is needed at all (skipped on the hot path when not)."""
        return any(getattr(self, name) > 0 for name in _RATE_FIELDS)

    def to_argv(self) -> list[str]:
        """Flags that ``MockConfig.from_argv`` turns back into an equal config."""
        argv: list[str] = []
        for f in fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value == f.default:
                continue
            if isinstance(value, bool):
                argv.append(flag)  # only --no-strict: strict is on by default
            elif isinstance(value, tuple):
                # An empty --model list cannot be spelled; it falls back to the defaults.
                for item in value:
                    argv += [flag, item]
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> MockConfig:
        """Parse flags made by ``to_argv`` (or typed by a person)."""
        parser = argparse.ArgumentParser(add_help=False)
        add_arguments(parser)
        return cls.from_namespace(parser.parse_args(argv))

    @classmethod
    def from_namespace(cls, ns: argparse.Namespace) -> MockConfig:
        """Build a config from a namespace filled by a parser set up with ``add_arguments``."""
        values = {f.name: getattr(ns, f.name) for f in fields(cls)}
        for name in ("models", "unknown_models"):
            if values[name] is None:
                values.pop(name)
        return cls(**values)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per ``MockConfig`` field to ``parser`` (dest = field name)."""
    for f in fields(MockConfig):
        flag, help_ = f.metadata["flag"], f.metadata["help"]
        if f.name == "strict":
            parser.add_argument(flag, dest="strict", action="store_false", help=help_)
        elif f.name in ("models", "unknown_models"):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_)
        elif f.name == "api_key":  # the environment keeps it out of `ps`
            parser.add_argument(flag, dest=f.name, default=os.environ.get(API_KEY_ENV),
                                help=f"{help_}; or set {API_KEY_ENV}")
        elif f.name == "ledger_file":
            parser.add_argument(flag, dest=f.name, default=None, help=help_)
        else:
            kind = type(f.default)
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, help=help_)
