"""The leaves of the job spec: endpoint, generation, limits, retry, price, budget, storage,
schedule, structured output, embeddings and batch settings (``JobSpec`` in ``__init__``
puts them together). Every model forbids unknown keys, so a typo is an error naming its
path (``limits.rmp: unknown key``) rather than a silently ignored setting."""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic._internal._model_construction import ModelMetaclass

from batchrun.errors import SpecError

__all__ = [
    "BatchSettings",
    "BudgetSpec",
    "EmbeddingSpec",
    "EndpointSpec",
    "GenerationSpec",
    "LimitsSpec",
    "PriceSpec",
    "ResponseFormatSpec",
    "RetrySpec",
    "ScheduleSpec",
    "SimulateSpec",
    "StorageSpec",
]

_LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Prefixes of common keys that are also valid variable names (sk_live_..., hf_...).
_KEY_PREFIXES = ("sk_", "hf_", "gsk_", "ghp_", "github_pat_", "AIza")


_HEX_RE = re.compile(r"[0-9a-fA-F]{32,}")  # openssl rand -hex 16/32 (vLLM --api-key)
# a run of 16+ letters and digits holding a digit: a token's body, not a word of a name
_TOKEN_PART_RE = re.compile(r"(?=[A-Za-z]*[0-9])[A-Za-z0-9]{16,}")


def _looks_like_key(value: str) -> bool:
    """True when ``api_key_env`` holds a key rather than an environment variable's name."""
    if not _ENV_NAME_RE.fullmatch(value):  # sk-..., xai-..., anything with - . / + =
        return True
    if value.startswith(_KEY_PREFIXES) and len(value) >= 20:  # hf_token is a fine name
        return True
    if _HEX_RE.fullmatch(value):
        return True
    # a long mix of lower case, upper case and digits is a token, not a variable name
    mixed = (any(c.islower() for c in value) and any(c.isupper() for c in value)
             and any(c.isdigit() for c in value))
    return len(value) >= 32 and mixed


def _echoable(name: str) -> bool:
    """Whether a message may repeat ``api_key_env``'s value. Rule: only a legal variable
    name (lower case too: my_key) that no heuristic calls a key and has no part that reads
    as a token's body (fw_3ZabcdEFGH12345678); a doubtful name is not repeated, since the
    point is that no message ever shows a secret."""
    return (not _looks_like_key(name)
            and not any(_TOKEN_PART_RE.fullmatch(p) for p in name.split("_")))


def _error_line(path: str, err: ValidationError) -> str:
    """The one line a validation error becomes: the file (or model), the field, the fix."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{path}: {loc}: unknown key; remove it or check its spelling"
    if first["type"] == "missing":
        return f"{path}: {loc}: required field is missing; add it"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{path}: {loc}: {msg}"


class _OneLine(ModelMetaclass):
    """``JobSpec(name=...)`` in Python fails with load_spec's one-line SpecError, naming the
    model, not a file (not in ``__init__``: pydantic calls that of nested models too)."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except ValidationError as e:
            raise SpecError(_error_line(cls.__name__, e)) from None


class _Model(BaseModel, metaclass=_OneLine):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointSpec(_Model):
    api: str = Field(
        "openai", description="The provider's API, one of api/registry.py's PROVIDERS: "
        "openai (any OpenAI-compatible endpoint), anthropic (Messages API), gemini (native).")
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="OpenAI-compatible base URL ending in /v1; ignored when `simulate` is set.",
    )
    api_key_env: str | None = Field(
        None,
        description="NAME of the environment variable holding the API key (never the key). "
        "None for an endpoint without auth (a local vLLM).",
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="TCP+TLS connect timeout, seconds.")
    read_timeout_s: float = Field(120.0, gt=0, description="Whole-request timeout, seconds.")
    allow_insecure_http: bool = Field(
        False, description="Allow plain http:// to a host other than loopback (keys go in clear)."
    )
    max_response_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Answers larger than this are a row error."
    )

    @field_validator("api_key_env")
    @classmethod
    def _check_key_env(cls, v: str | None) -> str | None:
        # The message never repeats the value: it may be a pasted key.
        if v is not None and _looks_like_key(v):
            raise ValueError("holds something that is not an environment variable name (it "
                             "looks like an API key; remove it from this file): write the "
                             "NAME of the variable that holds the key, e.g. OPENAI_API_KEY, "
                             "and export OPENAI_API_KEY=<your key>")
        return v

    @field_validator("base_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        u = urlparse(v)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(
                f"{v!r} is not an http(s) URL; write it like https://api.openai.com/v1"
            )
        return v.rstrip("/")

    @model_validator(mode="after")
    def _check_insecure(self) -> EndpointSpec:
        u = urlparse(self.base_url)
        if u.scheme == "http" and u.hostname not in _LOOPBACK and not self.allow_insecure_http:
            raise ValueError(
                f"plain http:// to {u.hostname} would send the API key unencrypted; "
                "use https:// or set endpoint.allow_insecure_http: true"
            )
        return self


class SimulateSpec(_Model):
    """Start the built-in simulated provider on a free loopback port for this job."""

    rpm: int | None = Field(None, gt=0, description="Requests per minute the provider allows.")
    tpm: int | None = Field(None, gt=0, description="Tokens per minute the provider allows.")
    latency_ms: float = Field(0.0, ge=0, description="Added latency per answer, ms.")
    fail_rate: float = Field(0.0, ge=0, le=1, description="Share of answers that are HTTP 500.")
    reset_rate: float = Field(0.0, ge=0, le=1, description="Share of connections reset.")
    malformed_rate: float = Field(0.0, ge=0, le=1, description="Share of malformed JSON bodies.")
    latency_jitter_ms: float = Field(0.0, ge=0, description="Extra uniform latency 0..J ms.")
    invalid_json_rate: float = Field(0.0, ge=0, le=1, description="Share of structured answers "
                                     "that are broken JSON or break the schema.")
    truncate_rate: float = Field(0.0, ge=0, le=1, description="Share cut at max_tokens.")
    batch_delay_s: float = Field(1.0, ge=0, description="Batch API: processing time per batch.")
    batch_line_error_rate: float = Field(0.0, ge=0, le=1, description="Batch lines that fail.")
    batch_expire_every: int = Field(0, ge=0, description="Every Nth batch expires (0: never).")
    batch_fail_every: int = Field(0, ge=0, description="Every Nth batch fails (0: never).")
    input_tpm: int | None = Field(None, gt=0, description="Input tokens per minute (Anthropic).")
    output_tpm: int | None = Field(None, gt=0, description="Output tokens per minute (Anthropic).")
    overload_rate: float = Field(0.0, ge=0, le=1, description="Share answered 529 (Anthropic).")
    storm_every: float = Field(0.0, ge=0, description="Seconds between 429 storms (0: none).")
    storm_seconds: float = Field(0.0, ge=0, description="Length of each 429 storm, seconds.")
    seed: int = Field(0, description="Seed of the fault injection.")


class GenerationSpec(_Model):
    max_tokens: int = Field(..., gt=0, description="Upper bound of output tokens; bounds cost.")
    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature.")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass.")
    stop: list[str] | None = Field(None, description="Stop sequences.")
    seed: int | None = Field(None, description="Provider-side sampling seed.")
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="Presence penalty.")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="Frequency penalty.")
    extra_body: dict[str, Any] = Field(
        default_factory=dict, description="Other chat-completion parameters, passed through."
    )

    @field_validator("extra_body")
    @classmethod
    def _no_cost_override(cls, v: dict[str, Any]) -> dict[str, Any]:
        # these would bypass the worst case that budgets and TPM reserve (max_tokens x 1)
        taken = sorted(set(v) & {"max_tokens", "max_completion_tokens", "n", "model",
                                 "messages", "stream", "response_format"})
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot go in extra_body; use the spec's own "
                             "fields (generation.max_tokens, model, response_format)")
        return v

    def request_fields(self) -> dict[str, Any]:
        """The body fields these settings add to every chat-completion request."""
        body = self.model_dump(exclude={"extra_body"}, exclude_none=True)
        body.update(self.extra_body)
        return body


class LimitsSpec(_Model):
    rpm: int | None = Field(None, gt=0, description="Requests per minute, for the whole job "
                            "(required, unless `engine:` is set: its capacity is the limit).")
    tpm: int | None = Field(
        None, gt=0, description="Tokens per minute (prompt estimate + max_tokens), whole job."
    )
    max_concurrency: int = Field(64, gt=0, description="Requests in flight, whole job.")
    input_tpm: int | None = Field(None, gt=0, description="Input tokens per minute (Anthropic).")
    output_tpm: int | None = Field(None, gt=0, description="Output tokens per minute (Anthropic).")


class RetrySpec(_Model):
    max_attempts: int = Field(5, ge=1, description="Attempts per row, the first one included.")
    backoff_base_s: float = Field(0.5, gt=0, description="First backoff ceiling, seconds.")
    backoff_cap_s: float = Field(30.0, gt=0, description="Largest backoff ceiling, seconds.")
    jitter: Literal["full"] = Field("full", description="Full jitter: sleep U(0, ceiling).")
    breaker_requests: int = Field(
        20, ge=0, description="Stop the job (exit 7) when a worker's first this many requests "
        "all fail the same job-wide way: HTTP 401, 403, 404, connection refused, DNS; "
        "a success first disarms it; 0: off.")
    max_error_rate: float = Field(
        0.5, gt=0, le=1, description="Stop the job (exit 7) when more than this share of "
        "the last error_window_rows sent rows ended status=error; 1: never.")
    error_window_rows: int = Field(
        200, ge=200, description="Rows of the rolling window max_error_rate is judged on.")


class PriceSpec(_Model):
    input_per_1m: float | None = Field(None, ge=0, description="USD per 1M input tokens.")
    output_per_1m: float | None = Field(None, ge=0, description="USD per 1M output tokens.")
    batch_input_per_1m: float | None = Field(None, ge=0, description="Batch API input price.")
    batch_output_per_1m: float | None = Field(None, ge=0, description="Batch API output price.")
    gpu_hour_usd: float | None = Field(
        None, ge=0, description="Self-hosted (`engine:`): USD per GPU hour; the job's cost is "
        "its replicas' GPU time, and tokens cost nothing.")

    @model_validator(mode="after")
    def _token_prices(self) -> PriceSpec:
        if self.gpu_hour_usd is None and (self.input_per_1m is None or self.output_per_1m is None):
            raise ValueError("give input_per_1m and output_per_1m (or gpu_hour_usd with engine:)")
        return self


class BudgetSpec(_Model):
    max_cost_usd: float | None = Field(None, gt=0, description="Hard cap for this job, USD.")
    daily_usd: float | None = Field(
        None, gt=0, description="Cap per day shared by every job using the same ledger."
    )
    ledger_dir: str | None = Field(None, description="Folder of the shared daily ledger.")
    timezone: str = Field("UTC", description="Time zone in which ledger days are counted.")

    @model_validator(mode="after")
    def _ledger_needed(self) -> BudgetSpec:
        if self.daily_usd is not None and not self.ledger_dir:
            raise ValueError("budget.daily_usd needs budget.ledger_dir (a folder shared by jobs)")
        return self


class StorageSpec(_Model):
    """Where ``s3://`` (and S3-compatible) URIs point; never credentials (those come from the
    environment or the cloud's own files on each machine, see docs/storage.md)."""

    endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint (MinIO, Ceph), e.g. http://minio:9000; "
        "default: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS.")
    region: str | None = Field(None, description="Region of the buckets; default: AWS_REGION.")


class ScheduleSpec(_Model):
    cron: str = Field(..., description='Cron expression, e.g. "0 2 * * *".')
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    catch_up: Literal["latest", "all", "none"] = Field(
        "latest", description="Missed slots while the scheduler was down: run the latest once."
    )


class ResponseFormatSpec(_Model):
    json_schema: dict[str, Any] | str | None = Field(
        None, description="A JSON Schema, inline or as a file path."
    )
    pydantic: str | None = Field(None, description="package.module:Model whose schema to use.")
    name: str = Field("answer", description="Schema name sent to the provider.")
    strict: bool = Field(True, description="Ask the provider for strict schema adherence.")
    expand: bool = Field(False, description="Top-level properties become typed columns.")

    @model_validator(mode="after")
    def _one_source(self) -> ResponseFormatSpec:
        if (self.json_schema is None) == (self.pydantic is None):
            raise ValueError("give exactly one of response_format.json_schema or .pydantic")
        return self


class EmbeddingSpec(_Model):  # task: embeddings: rows packed into POST /v1/embeddings
    dimensions: int | None = Field(None, gt=0, description="Vector size asked for; passed on.")
    inputs_per_request: int = Field(128, ge=1, le=2048, description="Rows one request carries.")
    encoding_format: Literal["base64", "float"] = Field(
        "base64", description="How vectors travel: base64 (compact; decoded here) or float.")


class BatchSettings(_Model):
    completion_window: str = Field("24h", description="Provider completion window.")
    max_requests_per_file: int = Field(50_000, gt=0, description="Requests per JSONL file.")
    max_bytes_per_file: int = Field(200 * 1024 * 1024, gt=0, description="Bytes per JSONL file.")
    poll_interval_s: float = Field(30.0, gt=0, description="Longest wait between status polls.")
    fallback: Literal["none", "online"] = Field(
        "none", description="Send failed/expired rows online instead of in a new batch."
    )
    max_enqueued_tokens: int | None = Field(None, gt=0, description="Queue quota, prompt tokens.")
    max_enqueued_requests: int | None = Field(None, gt=0, description="Queue quota, requests.")
