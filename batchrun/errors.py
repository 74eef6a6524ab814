"""The one exception tree of batchrun.

    BatchrunError                      everything batchrun raises on purpose
    ├── UserError                      bad input: the CLI prints one line, exits 2
    │   ├── SpecError                  the job spec (YAML, fields, values)
    │   ├── InputDataError             input Parquet: path, columns, types, duplicate ids
    │   ├── SecretError                the API-key variable is unset
    │   └── ResumeRefused              output folder holds a different job (fingerprint)
    ├── OutputError                    results cannot be written (permissions, disk)
    ├── BudgetExhausted                the next reservation would break the cap
    ├── ClusterError                   Ray could not be started/joined, actors lost for good
    └── RequestError                   one chat-completion attempt failed (a row error)
        ├── RetryableError             429, 5xx, timeout, reset, malformed body
        │   └── RateLimited            429, with the provider's Retry-After
        └── FatalRequestError          400/401/403/404 and other 4xx: never retried

Library errors (aiohttp, pyarrow, yaml, pydantic) are translated into this tree at one
boundary each (client.py, shards.py, spec.py) with ``raise ... from``. Request errors
are classified by status code, never by message text.
"""

from __future__ import annotations

__all__ = [
    "BatchrunError",
    "BudgetExhausted",
    "ClusterError",
    "FatalRequestError",
    "InputDataError",
    "OutputError",
    "RateLimited",
    "RequestError",
    "ResumeRefused",
    "RetryableError",
    "SecretError",
    "SpecError",
    "UserError",
]


class BatchrunError(Exception):
    """Base of every error batchrun raises on purpose."""


class UserError(BatchrunError):
    """Bad input the user can fix; the CLI prints the message as one line and exits 2."""

    exit_code = 2


class SpecError(UserError):
    """The job spec is invalid: YAML syntax, unknown key, bad value."""


class InputDataError(UserError):
    """The input Parquet data cannot serve the job: missing path, column, type, duplicates."""


class SecretError(UserError):
    """The environment variable that should hold the API key is unset or empty."""


class ResumeRefused(UserError):
    """The output folder holds results of a different job or different inputs."""


class OutputError(BatchrunError):
    """Results cannot be written; nothing written so far is lost, rerun to resume."""

    exit_code = 3


class BudgetExhausted(BatchrunError):
    """The budget cap would be broken by the next request; remaining rows stay unsent."""

    exit_code = 4


class ClusterError(BatchrunError):
    """Ray could not be started or joined, or the job lost its actors for good."""

    exit_code = 5


class RequestError(BatchrunError):
    """One attempt of one chat-completion request failed.

    ``error_type`` is the stable name recorded in the results' ``error_type`` column.
    """

    error_type = "request_error"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        if error_type is not None:
            self.error_type = error_type


class RetryableError(RequestError):
    """A transient failure: worth another attempt after a backoff."""

    error_type = "retryable"


class RateLimited(RetryableError):
    """HTTP 429. ``retry_after`` is the provider's Retry-After in seconds, if it sent one."""

    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message, status=429)
        self.retry_after = retry_after


class FatalRequestError(RequestError):
    """A failure another attempt cannot fix (bad request, auth, unknown model)."""

    error_type = "fatal"
