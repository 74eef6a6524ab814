"""The job spec: the YAML file a user writes, as pydantic v2 models.

Every model forbids unknown keys, so a typo is an error naming its path
(``limits.rmp: unknown key``) rather than a silently ignored setting.
``load_spec`` is the one boundary where YAML and pydantic errors become
``SpecError`` with a single line naming the file, the field and the fix.
"""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from batchrun.errors import SecretError, SpecError
from batchrun.spec.engine import EngineSpec, engine_problem
from batchrun.spec.parts import (
    _NAME_RE,
    BatchSettings,
    BudgetSpec,
    EmbeddingSpec,
    EndpointSpec,
    GenerationSpec,
    LimitsSpec,
    PriceSpec,
    ResponseFormatSpec,
    RetrySpec,
    ScheduleSpec,
    SimulateSpec,
    StorageSpec,
    _echoable,
    _error_line,
    _Model,
)

__all__ = [
    "EMBEDDINGS_FLUSH_ROWS",
    "BatchSettings",
    "BudgetSpec",
    "EmbeddingSpec",
    "EndpointSpec",
    "EngineSpec",
    "GenerationSpec",
    "JobSpec",
    "LimitsSpec",
    "PriceSpec",
    "ResponseFormatSpec",
    "RetrySpec",
    "ScheduleSpec",
    "SimulateSpec",
    "StorageSpec",
    "load_spec",
    "resolve_api_key",
]

# An embeddings request answers 128 rows (by default) for a fraction of a cent: a checkpoint
# every 500 rows would be one every four requests, and each costs the driver a file (a few
# ms of CPU to write, then to merge), a third of its time at tens of thousands of rows a
# second. 2,048 rows is still at most 8 MB of 1,024-float vectors held per table.
EMBEDDINGS_FLUSH_ROWS = 2048


class JobSpec(_Model):
    """A job's spec: ``JobSpec.from_yaml(path)``, or ``JobSpec(name=...)`` (the same checks)."""

    name: str = Field(..., description="Job name; names the Ray actors batchrun:<name>:...")
    input: str = Field(..., description="Parquet file, folder or glob; may use {ds}.")
    task: str = Field(
        "chat", description="The request kind, one of api/registry.py's KINDS: chat "
        "(chat completions), embeddings, responses (the Responses API).")
    prompt_column: str | None = Field(None, description="Column of plain-text prompts.")
    messages_column: str | None = Field(
        None, description="Column of chat messages: a list of {role, content}."
    )
    id_column: str | None = Field(
        None, description="Column of unique row ids; default: file name + row position."
    )
    system_prompt: str | None = Field(None, description="System message put before each prompt.")
    prompt_template: str | None = Field(None, description="Jinja2 prompt of the row's columns.")
    image_column: str | None = Field(None, description="Column of image URLs or bytes.")
    embedding: EmbeddingSpec = Field(default_factory=EmbeddingSpec, description="embeddings.")  # type: ignore[arg-type]
    carry_columns: list[str] = Field(
        default_factory=list, description="Input columns copied into the results."
    )
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec, description="The provider.")  # type: ignore[arg-type]
    simulate: SimulateSpec | None = Field(
        None, description="Run against the built-in simulated provider (no key, no network)."
    )
    model: str = Field(..., description="Model name sent to the provider.")
    generation: GenerationSpec = Field(..., description="Chat-completion parameters.")
    limits: LimitsSpec = Field(default_factory=LimitsSpec,  # type: ignore[arg-type]
                               description="Provider limits for the whole job.")
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Retry policy.")  # type: ignore[arg-type]
    workers: int = Field(2, ge=1, description="Number of worker actors.")
    shard_rows: int = Field(10_000, ge=1, description="Rows per shard (Parquet row groups).")
    flush_rows: int = Field(
        500, ge=1, description="Results are checkpointed to disk at least every this many "
        "rows (task: embeddings: 2048 unless set, see EMBEDDINGS_FLUSH_ROWS).")
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
    engine: EngineSpec | None = Field(
        None, description="Start self-hosted servers on the cluster (docs/engines.md).")
    storage: StorageSpec | None = Field(
        None, description="Object store settings for s3:// URIs (endpoint, region; no secrets).")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), e.g. nightly-tags")
        return v

    @model_validator(mode="before")
    @classmethod
    def _embeddings_defaults(cls, data: Any) -> Any:
        # an embedding has no output: generation (and its max_tokens) is optional there
        if isinstance(data, dict) and data.get("task") == "embeddings":
            return {"flush_rows": EMBEDDINGS_FLUSH_ROWS, **data,
                    "generation": {"max_tokens": 1, **(data.get("generation") or {})}}
        return data

    @model_validator(mode="after")
    def _one_prompt_source(self) -> JobSpec:
        given = [self.prompt_column, self.messages_column, self.prompt_template]
        if sum(x is not None for x in given) > 1:  # none: an OpenAI batch input file
            raise ValueError("give one of prompt_column, messages_column or prompt_template")
        return self

    @model_validator(mode="after")
    def _fits_the_api(self) -> JobSpec:
        if self.limits.output_tpm is not None and self.endpoint.api == "openai":
            raise ValueError("limits.output_tpm: an OpenAI endpoint limits tokens as one "
                             "figure; use limits.tpm there (output_tpm is for api: anthropic)")
        g, anthropic = self.generation, self.endpoint.api == "anthropic"
        for f in ("seed", "presence_penalty", "frequency_penalty") if anthropic else ():
            if getattr(g, f) is not None:  # the Messages API refuses them (HTTP 400)
                raise ValueError(f"generation.{f}: Anthropic has no such parameter; remove it")
        if anthropic and g.temperature is not None and g.temperature > 1:
            raise ValueError("generation.temperature: Anthropic takes 0 to 1; lower it")
        return self

    @model_validator(mode="after")
    def _engine_or_limits(self) -> JobSpec:
        if problem := engine_problem(self):
            raise ValueError(problem)
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
        if isinstance(raw.get(key), str) and not os.path.isabs(raw[key]) and "://" not in raw[key]:
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
