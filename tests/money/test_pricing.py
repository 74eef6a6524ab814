"""The shipped price table, model lookup, the spec override and exact cost arithmetic."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import pytest
from pydantic import ValidationError

from batchrun.errors import SpecError
from batchrun.money.pricing import (
    BatchPrice,
    TableEntry,
    cost_usd,
    load_price_table,
    lookup,
    price_for,
    worst_case_usd,
)
from batchrun.spec import JobSpec

REQUIRED = [
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "gpt-4o",
    "gpt-4o-mini",
    "o4-mini",
    "claude-sonnet-4.5",
    "claude-haiku-4.5",
    "gemini-2.5-flash",
    "gemini-2.5-pro",
    "deepseek-v3.2",
]


def make_spec(model: str, price: Any = None, **extra: Any) -> JobSpec:
    raw: dict[str, Any] = {
        "name": "t",
        "input": "/nonexistent/in.parquet",
        "prompt_column": "prompt",
        "model": model,
        "generation": {"max_tokens": 100},
        "limits": {"rpm": 60},
        "output": "/nonexistent/out",
        **extra,
    }
    if price is not None:
        raw["price"] = price
    return JobSpec.model_validate(raw)


def test_table_has_required_models_with_sources() -> None:
    table = load_price_table()
    for name in REQUIRED:
        entry = table.models[name]
        assert entry.source.startswith("https://"), name
        assert len(entry.as_of) == 7 and entry.as_of[4] == "-", name
    for name, entry in table.models.items():
        if entry.blended:
            assert entry.input_per_1m == entry.output_per_1m, name


@pytest.mark.parametrize(
    ("model", "inp", "out", "b_in", "b_out"),
    [
        ("gpt-4.1", 2.00, 8.00, 1.00, 4.00),
        ("gpt-4o-mini", 0.15, 0.60, 0.075, 0.30),
        ("claude-sonnet-4.5", 3.00, 15.00, 1.50, 7.50),
        ("gemini-2.5-flash", 0.30, 2.50, 0.15, 1.25),
        ("deepseek-v3.2", 0.28, 0.42, None, None),
    ],
)
def test_published_figures(model: str, inp: float, out: float, b_in: Any, b_out: Any) -> None:
    p = price_for(make_spec(model))
    assert (p.input_per_1m, p.output_per_1m) == (inp, out)
    assert p.batch_input_per_1m == b_in and p.batch_output_per_1m == b_out
    assert p.has_batch == (b_in is not None)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("GPT-4.1-mini", "gpt-4.1-mini"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # not gpt-4o: no bare prefix matching
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # its own, older price
        ("openai/gpt-4.1-nano", "gpt-4.1-nano"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4.5"),
        ("claude-haiku-4-5@20251001", "claude-haiku-4.5"),
        ("deepseek-chat", "deepseek-v3.2"),
        ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "llama-3.3-70b-instruct"),
        ("gemini-2.5-pro", "gemini-2.5-pro"),
    ],
)
def test_lookup_aliases_and_snapshots(name: str, expected: str) -> None:
    found = lookup(name)
    assert found is not None and found[0] == expected


@pytest.mark.parametrize("name", ["gpt-5-turbo-ultra", "my-finetune", "gpt-4.1x", "gpt"])
def test_lookup_unknown(name: str) -> None:
    assert lookup(name) is None


def test_unknown_model_without_price_is_a_spec_error_naming_the_fix() -> None:
    with pytest.raises(SpecError) as e:
        price_for(make_spec("my-finetune"))
    msg = str(e.value)
    assert msg.startswith("price:") and "my-finetune" in msg
    assert "input_per_1m" in msg and "price: 0" in msg


def test_self_hosted_is_free_online_and_batch() -> None:
    p = price_for(make_spec("my-llama", price=0))
    assert cost_usd(p, 10**6, 10**6) == 0.0 and cost_usd(p, 10**6, 10**6, batch=True) == 0.0


def test_override_keeps_table_batch_ratio() -> None:
    p = price_for(make_spec("gpt-4.1", price={"input_per_1m": 1.0, "output_per_1m": 3.0}))
    assert p.source.startswith("spec override") and p.table_name == "gpt-4.1"
    assert (p.batch_input_per_1m, p.batch_output_per_1m) == (0.5, 1.5)


def test_override_explicit_batch_and_unknown_model() -> None:
    spec = make_spec(
        "my-finetune", price={"input_per_1m": 1.0, "output_per_1m": 2.0, "batch_input_per_1m": 0.7}
    )
    p = price_for(spec)
    # Outside the table, only the batch field the override gives is known.
    assert p.batch_input_per_1m == 0.7 and p.batch_output_per_1m is None and not p.has_batch
    with pytest.raises(SpecError, match="no batch price"):
        cost_usd(p, 1, 1, batch=True)


def test_override_on_model_without_batch_api() -> None:
    p = price_for(make_spec("deepseek-chat", price={"input_per_1m": 0.5, "output_per_1m": 1.0}))
    assert not p.has_batch


def test_costs_are_exact() -> None:
    p = price_for(make_spec("gpt-4o-mini"))
    assert cost_usd(p, 10**6, 10**6) == 0.75
    assert cost_usd(p, 10**6, 10**6, batch=True) == 0.375
    # 0.075 and 0.28 are not exact binary fractions: the integer arithmetic must still
    # give the decimal result exactly (the float nearest to it).
    for model, inp, out in [("gpt-4o-mini", 1234, 567), ("deepseek-v3.2", 3, 7)]:
        q = price_for(make_spec(model))
        want = (Fraction(str(q.input_per_1m)) * inp + Fraction(str(q.output_per_1m)) * out) / 10**6
        assert cost_usd(q, inp, out) == float(want)
    with pytest.raises(ValueError):
        cost_usd(p, -1, 0)


def test_worst_case_margin_pads_only_the_prompt() -> None:
    p = price_for(make_spec("gpt-4.1"))
    assert worst_case_usd(p, 1000, 500) == cost_usd(p, 1000, 500)
    assert worst_case_usd(p, 1000, 500, margin=0.02) == cost_usd(p, 1020, 500)
    assert worst_case_usd(p, 1001, 0, margin=0.02) == cost_usd(p, 1022, 0)  # ceil(1021.02)
    assert worst_case_usd(p, 1000, 500, batch=True) == cost_usd(p, 1000, 500) / 2


def test_table_models_forbid_unknown_keys_and_bad_batch() -> None:
    base = {"input_per_1m": 1, "output_per_1m": 2, "batch": None, "as_of": "2025-01", "source": "x"}
    TableEntry.model_validate(base)
    with pytest.raises(ValidationError):
        TableEntry.model_validate({**base, "input_per_1M": 1})
    with pytest.raises(ValidationError):
        BatchPrice.model_validate({"discount": 0.5, "input_per_1m": 1})
    with pytest.raises(ValidationError):
        BatchPrice.model_validate({"input_per_1m": 1})
    assert BatchPrice.model_validate({"input_per_1m": 1, "output_per_1m": 2}).discount is None
