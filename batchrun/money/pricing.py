"""Model prices: the table shipped in ``batchrun/data/prices.yaml`` and the spec's override.

Costs are computed in integer pico-USD (1e-12 USD) per token, so that a bill is an
exact product of integers and the same token counts always give the same float; the
budget code (``budget.py``) relies on that to release exactly what it reserved.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from importlib import resources
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from batchrun.errors import SpecError
from batchrun.spec import JobSpec, PriceSpec

__all__ = [
    "BatchPrice",
    "ModelPrice",
    "PriceTable",
    "TableEntry",
    "cost_pico",
    "cost_usd",
    "load_price_table",
    "lookup",
    "price_for",
    "price_of_entry",
    "worst_case_usd",
]

PICO_PER_USD = 10**12
# Prompt caching, as Anthropic bills it: a (5-minute) cache write at 1.25x the input
# price, a cache read at 0.1x. Only providers that report cache tokens have any.
CACHE_WRITE_X = 1.25
CACHE_READ_X = 0.1
# Dated snapshots: gpt-4.1-2025-04-14, claude-sonnet-4-5-20250929, Vertex's @20250929.
_DATE_SUFFIX = re.compile(r"(-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-latest)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BatchPrice(_Strict):
    """How a provider's Batch API is billed: a discount, or explicit prices."""

    discount: float | None = Field(
        default=None, gt=0, le=1, description="Batch bills this share of online (0.5 = half)."
    )
    input_per_1m: float | None = Field(
        default=None, ge=0, description="Batch USD per 1M input tokens."
    )
    output_per_1m: float | None = Field(
        default=None, ge=0, description="Batch USD per 1M output tokens."
    )

    @model_validator(mode="after")
    def _one_form(self) -> BatchPrice:
        explicit = [self.input_per_1m is not None, self.output_per_1m is not None]
        if (self.discount is not None and not any(explicit)) or (
            self.discount is None and all(explicit)
        ):
            return self
        raise ValueError("batch: give either discount, or both input_per_1m and output_per_1m")


class TableEntry(_Strict):
    """One model of the shipped table."""

    input_per_1m: float = Field(..., ge=0, description="USD per 1M input tokens (uncached).")
    output_per_1m: float = Field(..., ge=0, description="USD per 1M output tokens.")
    cached_input_per_1m: float | None = Field(
        default=None, ge=0, description="USD per 1M cached input tokens; informational only."
    )
    batch: BatchPrice | None = Field(..., description="Batch API pricing; null = no batch API.")
    blended: bool = Field(
        default=False, description="Only one blended figure is published (input = output)."
    )
    aliases: list[str] = Field(default_factory=list, description="Other names of this model.")
    task: Literal["chat", "embeddings"] = Field(
        default="chat", description="What the model does: chat (and responses), embeddings.")
    as_of: str = Field(..., description="When the figures were taken (YYYY-MM).")
    source: str = Field(..., description="Where the figures were published.")


class PriceTable(_Strict):
    """The whole ``prices.yaml``."""

    version: Literal[1] = Field(..., description="Format version of the file.")
    models: dict[str, TableEntry] = Field(..., description="Prices by canonical model name.")


class ModelPrice(_Strict):
    """The price a job is billed at: the table's, the spec's override, or 0 (self-hosted)."""

    model: str = Field(..., description="The model name as the job spec gives it.")
    table_name: str | None = Field(
        default=None, description="The table entry it resolved to, if any."
    )
    input_per_1m: float = Field(..., ge=0, description="USD per 1M input tokens.")
    output_per_1m: float = Field(..., ge=0, description="USD per 1M output tokens.")
    batch_input_per_1m: float | None = Field(
        default=None, ge=0, description="Batch input; None = none."
    )
    batch_output_per_1m: float | None = Field(
        default=None, ge=0, description="Batch output; None = none."
    )
    source: str = Field(..., description="table (with its source), spec override, or self-hosted.")

    @property
    def has_batch(self) -> bool:
        return self.batch_input_per_1m is not None and self.batch_output_per_1m is not None


@lru_cache(maxsize=1)
def load_price_table() -> PriceTable:
    """The shipped table, parsed once; a broken file is a bug of the package, not the user."""
    text = resources.files("batchrun").joinpath("data/prices.yaml").read_text(encoding="utf-8")
    try:
        return PriceTable.model_validate(yaml.safe_load(text))
    except ValidationError as e:  # pragma: no cover - guarded by tests/test_pricing.py
        raise RuntimeError(f"batchrun/data/prices.yaml is invalid: {e}") from e


def _index(table: PriceTable) -> dict[str, str]:
    idx: dict[str, str] = {}
    for name, entry in table.models.items():
        for key in (name, *entry.aliases):
            idx[key.lower()] = name
    return idx


def lookup(model: str, table: PriceTable | None = None) -> tuple[str, TableEntry] | None:
    """The table entry of ``model``: exact name or alias, then without a gateway prefix
    (``openai/gpt-4.1``), then without a date suffix (``gpt-4.1-2025-04-14``).

    Prefix matching on bare strings is avoided on purpose: ``gpt-4o-mini-2024-07-18``
    starts with ``gpt-4o`` but is priced as gpt-4o-mini.
    """
    table = table or load_price_table()
    idx = _index(table)
    name = model.strip().lower()
    candidates = [name]
    if "/" in name:
        candidates.append(name.rsplit("/", 1)[1])
    candidates += [_DATE_SUFFIX.sub("", c) for c in list(candidates)]
    for c in candidates:
        if c in idx:
            return idx[c], table.models[idx[c]]
    return None


def _batch_ratios(entry: TableEntry | None) -> tuple[float, float] | None:
    """Batch price as a share of the online price, input and output; None = no batch API."""
    if entry is None or entry.batch is None:
        return None
    b = entry.batch
    if b.discount is not None:
        return b.discount, b.discount
    b_in, b_out = b.input_per_1m or 0.0, b.output_per_1m or 0.0
    return (
        b_in / entry.input_per_1m if entry.input_per_1m else 0.0,
        b_out / entry.output_per_1m if entry.output_per_1m else 0.0,
    )


def _batch_of(entry: TableEntry | None, inp: float, out: float) -> tuple[float | None, ...]:
    if entry is not None and entry.batch is not None and entry.batch.discount is None:
        return entry.batch.input_per_1m, entry.batch.output_per_1m  # explicit, as published
    ratios = _batch_ratios(entry)
    return (None, None) if ratios is None else (inp * ratios[0], out * ratios[1])


def _from_override(model: str, found: tuple[str, TableEntry] | None, o: PriceSpec) -> ModelPrice:
    # Batch fields the override leaves out follow the table's batch ratio applied to the
    # override's online prices (providers' batch discounts are proportional); a model
    # outside the table has no known batch price unless the override gives one.
    assert o.input_per_1m is not None and o.output_per_1m is not None  # price_for's case
    ratios = _batch_ratios(found[1] if found else None)
    derived = (
        (None, None)
        if ratios is None
        else (o.input_per_1m * ratios[0], o.output_per_1m * ratios[1])
    )
    b_in = o.batch_input_per_1m if o.batch_input_per_1m is not None else derived[0]
    b_out = o.batch_output_per_1m if o.batch_output_per_1m is not None else derived[1]
    return ModelPrice(
        model=model,
        table_name=found[0] if found else None,
        input_per_1m=o.input_per_1m,
        output_per_1m=o.output_per_1m,
        batch_input_per_1m=b_in,
        batch_output_per_1m=b_out,
        source="spec override (price:)",
    )


def price_of_entry(model: str, name: str, entry: TableEntry) -> ModelPrice:
    """The ModelPrice of one table entry."""
    b_in, b_out = _batch_of(entry, entry.input_per_1m, entry.output_per_1m)
    return ModelPrice(
        model=model,
        table_name=name,
        input_per_1m=entry.input_per_1m,
        output_per_1m=entry.output_per_1m,
        batch_input_per_1m=b_in,
        batch_output_per_1m=b_out,
        source=f"table {name} ({entry.source}, as of {entry.as_of})",
    )


def price_for(spec: JobSpec) -> ModelPrice:
    """The price of ``spec.model``: the spec's ``price:`` override merged over the table."""
    found = lookup(spec.model)
    if spec.price == 0 or (isinstance(spec.price, PriceSpec) and spec.price.input_per_1m is None):
        # Self-hosted (price: 0, or gpu_hour_usd: the engine's GPU time is the cost, not
        # tokens): nothing is billed per token, online or batch.
        return ModelPrice(
            model=spec.model,
            table_name=found[0] if found else None,
            input_per_1m=0.0,
            output_per_1m=0.0,
            batch_input_per_1m=0.0,
            batch_output_per_1m=0.0,
            source="self-hosted (price: 0)",
        )
    if isinstance(spec.price, PriceSpec):
        return _from_override(spec.model, found, spec.price)
    if found is None:
        raise SpecError(
            f"price: model {spec.model} has no price in the shipped table; add "
            "price: {input_per_1m: ..., output_per_1m: ...} or price: 0 for self-hosted"
        )
    return price_of_entry(spec.model, *found)


def _pico_per_token(per_1m: float) -> int:
    # USD per 1M tokens == micro-USD per token == 1e6 pico-USD per token. Rounding to
    # an integer is exact for any price with up to 6 decimals (every published one).
    return round(per_1m * 1_000_000)


def _rates(price: ModelPrice, batch: bool) -> tuple[float, float]:
    if not batch:
        return price.input_per_1m, price.output_per_1m
    if price.batch_input_per_1m is None or price.batch_output_per_1m is None:
        raise SpecError(
            f"price: model {price.model} has no batch price (its provider has no batch API "
            "in the shipped table); use mode: online, or set price.batch_input_per_1m and "
            "price.batch_output_per_1m"
        )
    return price.batch_input_per_1m, price.batch_output_per_1m


def cost_pico(price: ModelPrice, prompt_tokens: int, completion_tokens: int, batch: bool,
              cache_write: int = 0, cache_read: int = 0) -> int:
    """The exact cost in pico-USD (integers, no rounding error); ``cache_write`` and
    ``cache_read`` are the parts of ``prompt_tokens`` billed at the cache rates."""
    p_in, p_out = _rates(price, batch)
    pin = _pico_per_token(p_in)
    plain = prompt_tokens - cache_write - cache_read
    return (plain * pin + cache_write * round(pin * CACHE_WRITE_X)
            + cache_read * round(pin * CACHE_READ_X) + completion_tokens * _pico_per_token(p_out))


def cost_usd(
    price: ModelPrice, prompt_tokens: int, completion_tokens: int, batch: bool = False,
    cache_write: int = 0, cache_read: int = 0,
) -> float:
    """What a request with these token counts is billed, USD."""
    if min(prompt_tokens, completion_tokens, cache_write, cache_read) < 0 or (
            cache_write + cache_read > prompt_tokens):
        raise ValueError("token counts cannot be negative, nor cache tokens exceed the prompt")
    return cost_pico(price, prompt_tokens, completion_tokens, batch, cache_write,
                     cache_read) / PICO_PER_USD


def worst_case_usd(
    price: ModelPrice,
    prompt_tokens: int,
    max_tokens: int,
    batch: bool = False,
    margin: float = 0.0,
) -> float:
    """The most a request can cost: its prompt, times ``1 + margin``, plus ``max_tokens``.

    ``margin`` covers a provider whose tokenizer counts a few more prompt tokens than
    our estimate (Claude, Gemini and open models are estimated with cl100k_base):
    0.02 reserves 1.02x the prompt estimate. The output side needs none: providers
    never bill more than ``max_tokens`` of output.
    """
    if margin < 0:
        raise ValueError("margin cannot be negative")
    padded = math.ceil(prompt_tokens * (1.0 + margin)) if margin else prompt_tokens
    return cost_usd(price, padded, max_tokens, batch)
