"""The job spec: the YAML file a user writes, as pydantic v2 models.

Every model forbids unknown keys, so a typo is an error naming its path
(``limits.rmp: unknown key``) rather than a silently ignored setting.
``load_spec`` is the one boundary where YAML and pydantic errors become
``SpecError`` with a single line naming the file, the field and the fix.
"""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic._internal._model_construction import ModelMetaclass

from batchrun.errors import SecretError, SpecError

__all__ = [
    "BatchSettings",
    "BudgetSpec",
    "EndpointSpec",
    "GenerationSpec",
    "JobSpec",
    "LimitsSpec",
    "PriceSpec",
    "ResponseFormatSpec",
    "RetrySpec",
    "ScheduleSpec",
    "SimulateSpec",
    "load_spec",
    "resolve_api_key",
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
        "openai (any OpenAI-compatible endpoint).")
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
    rpm: int = Field(..., gt=0, description="Requests per minute, for the whole job.")
    tpm: int | None = Field(
        None, gt=0, description="Tokens per minute (prompt estimate + max_tokens), whole job."
    )
    max_concurrency: int = Field(64, gt=0, description="Requests in flight, whole job.")


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
    input_per_1m: float = Field(..., ge=0, description="USD per 1M input tokens.")
    output_per_1m: float = Field(..., ge=0, description="USD per 1M output tokens.")
    batch_input_per_1m: float | None = Field(None, ge=0, description="Batch API input price.")
    batch_output_per_1m: float | None = Field(None, ge=0, description="Batch API output price.")


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


class BatchSettings(_Model):
    completion_window: str = Field("24h", description="Provider completion window.")
    max_requests_per_file: int = Field(50_000, gt=0, description="Requests per JSONL file.")
    max_bytes_per_file: int = Field(200 * 1024 * 1024, gt=0, description="Bytes per JSONL file.")
    poll_interval_s: float = Field(30.0, gt=0, description="Longest wait between status polls.")
    fallback: Literal["none", "online"] = Field(
        "none", description="Send failed/expired rows online instead of in a new batch."
    )


class JobSpec(_Model):
    """A job's spec: ``JobSpec.from_yaml(path)``, or ``JobSpec(name=...)`` (the same checks)."""

    name: str = Field(..., description="Job name; names the Ray actors batchrun:<name>:...")
    input: str = Field(..., description="Parquet file, folder or glob; may use {ds}.")
    task: str = Field(
        "chat", description="The request kind, one of api/registry.py's KINDS: chat "
        "(chat completions).")
    prompt_column: str | None = Field(None, description="Column of plain-text prompts.")
    messages_column: str | None = Field(
        None, description="Column of chat messages: a list of {role, content}."
    )
    id_column: str | None = Field(
        None, description="Column of unique row ids; default: file name + row position."
    )
    system_prompt: str | None = Field(None, description="System message put before each prompt.")
    carry_columns: list[str] = Field(
        default_factory=list, description="Input columns copied into the results."
    )
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec, description="The provider.")  # type: ignore[arg-type]
    simulate: SimulateSpec | None = Field(
        None, description="Run against the built-in simulated provider (no key, no network)."
    )
    model: str = Field(..., description="Model name sent to the provider.")
    generation: GenerationSpec = Field(..., description="Chat-completion parameters.")
    limits: LimitsSpec = Field(..., description="Provider limits for the whole job.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Retry policy.")  # type: ignore[arg-type]
    workers: int = Field(2, ge=1, description="Number of worker actors.")
    shard_rows: int = Field(10_000, ge=1, description="Rows per shard (Parquet row groups).")
    flush_rows: int = Field(
        500, ge=1, description="Results are checkpointed to disk at least every this many rows."
    )
    output: str = Field(..., description="Output folder; may use {ds}.")
    price: PriceSpec | Literal[0] | None = Field(
        None, description="Price of this model, overriding the shipped table; 0 if self-hosted."
    )
    budget: BudgetSpec = Field(default_factory=BudgetSpec, description="Spending caps.")  # type: ignore[arg-type]
    schedule: ScheduleSpec | None = Field(None, description="Run nightly (batchrun scheduler).")
    mode: Literal["online", "batch"] = Field("online", description="Online requests or Batch API.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch-mode settings.")  # type: ignore[arg-type]
    response_format: ResponseFormatSpec | None = Field(
        None, description="Structured output: answers validated against a JSON Schema."
    )

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), e.g. nightly-tags")
        return v

    @model_validator(mode="after")
    def _one_prompt_source(self) -> JobSpec:
        if (self.prompt_column is None) == (self.messages_column is None):
            raise ValueError("give exactly one of prompt_column or messages_column")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path, *, ds: date | str | None = None) -> JobSpec:
        """Read and validate a job spec file, exactly as ``batchrun run`` does (``load_spec``)."""
        return load_spec(path, ds=ds)

    def with_date(self, ds: date | str) -> JobSpec:
        """This spec with ``{ds}`` in input and output replaced by the run date."""
        s = ds if isinstance(ds, str) else ds.isoformat()
        return self.model_copy(
            update={"input": self.input.replace("{ds}", s),
                    "output": self.output.replace("{ds}", s)}
        )


def _error_line(path: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{path}: {loc}: unknown key; remove it or check its spelling"
    if first["type"] == "missing":
        return f"{path}: {loc}: required field is missing; add it"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{path}: {loc}: {msg}"


def _spec_text(p: Path) -> str:
    """The spec file's text; a folder, a data file or an unreadable file is one line."""
    if p.is_dir():
        specs = sorted(str(f) for f in p.iterdir() if f.suffix in (".yaml", ".yml"))[:3]
        hint = f": {', '.join(specs)}" if specs else ""
        raise SpecError(f"{p}: is a folder, not a job spec; give one spec file{hint}")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(f"{p}: no such file; check the path of the job spec") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read the job spec ({e.strerror or e})") from None
    what = "Parquet data" if data[:4] == b"PAR1" else "a binary file"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "\0"
    if "\0" in text:
        raise SpecError(f"{p}: is {what}, not a job spec (YAML); give the spec file, whose "
                        "input: names the data")
    return text


def load_spec(path: str | Path, *, ds: date | str | None = None,
              defaults: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a job spec; relative paths in it are taken from the spec's folder
    (``defaults``: keys it may leave out, as a Ray Data pipeline's input and output)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(_spec_text(p))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SpecError(f"{p}:{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: a job spec is a YAML mapping (name:, input:, model:, ...)")
    for key in ("input", "output"):
        if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]):
            raw[key] = str((p.parent / raw[key]).resolve())
    raw = {**(defaults or {}), **raw}
    try:
        spec = JobSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(_error_line(str(p), e)) from None
    return spec.with_date(ds) if ds is not None else spec


def resolve_api_key(spec: JobSpec, *, spec_path: str = "job spec") -> str | None:
    """The API key from the environment, or None when the endpoint needs none."""
    name = spec.endpoint.api_key_env
    if name is None:
        return None
    key = os.environ.get(name, "")
    if key:
        return key
    if not _echoable(name):  # it may be a pasted key: never repeat it
        raise SecretError(
            f"{spec_path}: endpoint.api_key_env must name an environment variable that holds "
            "the key, and it names none that is set (its value is not shown: it may be a "
            "key); write e.g. OPENAI_API_KEY there and export OPENAI_API_KEY=<your key>")
    raise SecretError(
        f"{spec_path}: endpoint.api_key_env: environment variable {name} is unset or empty; "
        f"export {name}=<your key>")
