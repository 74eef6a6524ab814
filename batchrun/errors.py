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
    ├── JobCannotSucceed               stopped early: every request fails the same way, the
    │                                  error rate passed max_error_rate, a provider stays down
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
    "EXIT_PENDING",
    "EXIT_ROW_ERRORS",
    "BatchrunError",
    "BudgetExhausted",
    "ClusterError",
    "FatalRequestError",
    "InputDataError",
    "JobCannotSucceed",
    "OutputError",
    "RateLimited",
    "RequestError",
    "ResumeRefused",
    "RetryableError",
    "SecretError",
    "SpecError",
    "UserError",
]


# Exit codes of `batchrun run` besides the errors' own (documented in the README):
# 0 every row ok; 2 bad input; 3 output not writable; 4 budget exhausted; 5 cluster lost;
# 6 finished, but some rows ended status=error; 7 stopped early (JobCannotSucceed);
# 10 batches pending (--no-wait). The scheduler and `submit --wait` read them.
EXIT_ROW_ERRORS = 6
EXIT_PENDING = 10


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


class JobCannotSucceed(BatchrunError):
    """The job was stopped early because it cannot succeed; unsent rows stay unsent.

    Raised by the circuit breaker (the first requests all failed the same non-retryable
    way: 401, 403, 404, connection refused), by ``max_error_rate``, and by a provider
    API that stays unavailable past the retry policy. Rerun once the cause is fixed.
    """

    exit_code = 7


class RequestError(BatchrunError):
    """One attempt of one chat-completion request failed.

    ``error_type`` is the stable name recorded in the results' ``error_type`` column.
    """

    error_type = "request_error"

    def __init__(self, message: str, *, status: int | None = None, error_type: str | None = None,
                 retry_after: float | None = None, maybe_billed: bool = False):
        super().__init__(message)
        self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.retry_after = retry_after  # the provider's Retry-After, seconds, if it sent one
        # the request may have been processed and billed (a timeout, a cut connection, a
        # 200 whose body was refused): the budget settles it at its worst case
        self.maybe_billed = maybe_billed


class RetryableError(RequestError):
    """A transient failure: worth another attempt after a backoff."""

    error_type = "retryable"


class RateLimited(RetryableError):
    """HTTP 429. ``retry_after`` is the provider's Retry-After in seconds, if it sent one."""

    error_type = "rate_limited"

    def __init__(self, message: str, *, retry_after: float | None = None):
        super().__init__(message, status=429, retry_after=retry_after)


class FatalRequestError(RequestError):
    """A failure another attempt cannot fix (bad request, auth, unknown model)."""

    error_type = "fatal"
