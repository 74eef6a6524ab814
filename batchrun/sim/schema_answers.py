"""Answers of the simulated provider to structured-output requests: JSON Schema instances.

Pure functions, no I/O. ``instance_for(schema, seed)`` builds a value that conforms to
``schema`` (deterministic in ``seed``, which the server takes from the prompt key), and
``structured_answer`` turns it into the ``(content, completion_tokens, finish_reason)``
triple of an answer, possibly spoiled on purpose ("fates"), so that a client's
validation and retry path can be exercised:

    ok                 compact JSON of a conforming instance
    broken_json        text that is not JSON at all (a cut object, a chatty preamble)
    schema_violation   JSON that breaks the schema (a required property dropped, a wrong type)
    truncated          the JSON cut in half, finish_reason "length"

Supported keywords: type (also lists), properties, required, additionalProperties (no
extra keys are ever added), minProperties, items, prefixItems, minItems, maxItems,
uniqueItems, enum, const, minLength, maxLength, format (date-time, date, time, email,
uri, uuid), minimum, maximum, exclusiveMinimum, exclusiveMaximum, multipleOf, anyOf,
oneOf (a branch is picked; overlapping oneOf branches are not detected), allOf
(shallowly merged), local ``$ref`` (``#``, ``#/$defs/...``, ``#/definitions/...``).
Not supported: ``pattern`` (strings are plain words), ``not``, if/then/else.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from typing import Any

__all__ = [
    "FATES",
    "broken_json",
    "draw_fate",
    "instance_for",
    "invalid_instance",
    "structured_answer",
]

FATES: tuple[str, ...] = ("ok", "broken_json", "schema_violation", "truncated")

_WORDS = ("alpha", "river", "stone", "light", "green", "cloud", "field", "music", "paper")
_MAX_DEPTH = 6  # beyond it optional properties are left out, so recursive schemas end
_FORMATS = {
    "date-time": "2024-05-17T08:30:00Z", "date": "2024-05-17", "time": "08:30:00Z",
    "email": "someone@example.com", "uri": "https://example.com/item",
    "hostname": "example.com", "ipv4": "192.0.2.7",
}
_SCALAR_KEYS = {"string": ("minLength", "maxLength", "format"),
                "number": ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")}


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Generator:
    """Walks one schema with one seeded RNG; ``root`` resolves local ``$ref``."""

    def __init__(self, root: Any, seed: int):
        self.root = root
        self.rng = random.Random(seed)

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            raise ValueError(f"only local $ref is supported, not {ref!r}")
        node = self.root
        for part in filter(None, ref[1:].split("/")):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return node

    def value(self, s: Any, depth: int = 0) -> Any:
        if s is True or s == {} or not isinstance(s, dict):
            return self.rng.choice(_WORDS)  # anything goes (False has no instance at all)
        if "$ref" in s:
            return self.value({**self.resolve(s["$ref"]), **_without(s, "$ref")}, depth)
        if "const" in s:
            return s["const"]
        if "enum" in s:
            return self.rng.choice(s["enum"])
        if "allOf" in s:
            return self.value(_merge([_without(s, "allOf"), *s["allOf"]]), depth)
        for key in ("anyOf", "oneOf"):
            if key in s:
                branch = self.rng.choice(s[key])
                return self.value(_merge([_without(s, key), branch]), depth)
        kind = self._type(s)
        return getattr(self, f"_{kind}")(s, depth)

    def _type(self, s: dict[str, Any]) -> str:
        t = s.get("type")
        if isinstance(t, list):
            # prefer a non-null type: an all-null answer exercises little
            t = self.rng.choice([x for x in t if x != "null"] or ["null"])
        if isinstance(t, str):
            return t
        if "properties" in s or "required" in s:
            return "object"
        if "items" in s or "prefixItems" in s or "minItems" in s:
            return "array"
        return next((k for k, keys in _SCALAR_KEYS.items() if any(x in s for x in keys)),
                    "string")

    def _object(self, s: dict[str, Any], depth: int) -> dict[str, Any]:
        props: dict[str, Any] = s.get("properties", {})
        required = list(s.get("required", []))
        optional = [k for k in props if k not in required]
        want = len(required) + max(0, s.get("minProperties", 0) - len(required))
        chosen = required + [k for k in optional
                             if depth < _MAX_DEPTH and self.rng.random() < 0.5]
        chosen += [k for k in optional if k not in chosen][: max(0, want - len(chosen))]
        return {k: self.value(props.get(k, {}), depth + 1) for k in chosen}

    def _array(self, s: dict[str, Any], depth: int) -> list[Any]:
        prefix = s.get("prefixItems", [])
        hi = s.get("maxItems", max(len(prefix), s.get("minItems", 0)) + 3)
        if s.get("items") is False:  # nothing allowed after the prefix
            hi = min(hi, len(prefix))
        lo = max(s.get("minItems", 0), min(len(prefix), hi))
        n = self.rng.randint(lo, max(lo, min(hi, lo + 3)))
        items = s.get("items", {})
        out: list[Any] = []
        seen: set[str] = set()
        for i in range(n):
            sub = prefix[i] if i < len(prefix) else items
            for _ in range(50):  # uniqueItems: redraw a duplicate a few times
                v = self.value(sub, depth + 1)
                if not s.get("uniqueItems") or _compact(v) not in seen:
                    break
            else:
                if i >= lo:  # enough items already: stop rather than repeat one
                    break
            seen.add(_compact(v))
            out.append(v)
        return out

    def _string(self, s: dict[str, Any], depth: int) -> str:
        if s.get("format") == "uuid":
            return f"{self.rng.getrandbits(32):08x}-0000-4000-8000-{self.rng.getrandbits(48):012x}"
        if s.get("format") in _FORMATS:
            return _FORMATS[s["format"]]
        hi = s.get("maxLength", 40)
        lo = s.get("minLength", min(1, hi))
        words = [self.rng.choice(_WORDS) for _ in range(self.rng.randint(1, 4))]
        text = " ".join(words)
        while len(text) < lo:
            text += " " + self.rng.choice(_WORDS)
        return text[:hi] if hi >= lo else text[:lo]

    def _integer(self, s: dict[str, Any], depth: int) -> int:
        lo, hi = _bounds(s, step=1.0)
        lo_i, hi_i = math.ceil(lo), math.floor(hi)
        step = s.get("multipleOf")
        if isinstance(step, int) and step > 0:
            k_lo, k_hi = math.ceil(lo_i / step), math.floor(hi_i / step)
            return step * self.rng.randint(k_lo, max(k_lo, k_hi))
        return self.rng.randint(lo_i, max(lo_i, hi_i))

    def _number(self, s: dict[str, Any], depth: int) -> float | int:
        lo, hi = _bounds(s, step=1e-6)
        step = s.get("multipleOf")
        if step:
            # k * step is picked so that (k * step) / step == k exactly, as the
            # validator checks multipleOf by that division.
            k_lo, k_hi = math.ceil(lo / step), math.floor(hi / step)
            for _ in range(20):
                k = self.rng.randint(k_lo, max(k_lo, k_hi))
                if (k * step) / step == k:
                    return k * step
            return k_lo * step
        x = round(self.rng.uniform(lo, hi), 2)
        return x if lo <= x <= hi else lo

    def _boolean(self, s: dict[str, Any], depth: int) -> bool:
        return self.rng.random() < 0.5

    def _null(self, s: dict[str, Any], depth: int) -> None:
        return None


def _without(s: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in s.items() if k != key}


def _merge(parts: list[Any]) -> dict[str, Any]:
    """allOf, shallowly: properties united, required concatenated, other keys last-wins."""
    out: dict[str, Any] = {}
    for p in parts:
        if not isinstance(p, dict):
            continue
        for k, v in p.items():
            if k == "properties":
                out["properties"] = {**out.get("properties", {}), **v}
            elif k == "required":
                out["required"] = list(dict.fromkeys([*out.get("required", []), *v]))
            else:
                out[k] = v
    return out


def _bounds(s: dict[str, Any], step: float) -> tuple[float, float]:
    """The [lo, hi] range allowed by (exclusive) minimum/maximum; 0..100 when open."""
    lo = s.get("minimum", -math.inf)
    if "exclusiveMinimum" in s and not isinstance(s["exclusiveMinimum"], bool):
        lo = max(lo, s["exclusiveMinimum"] + step)
    hi = s.get("maximum", math.inf)
    if "exclusiveMaximum" in s and not isinstance(s["exclusiveMaximum"], bool):
        hi = min(hi, s["exclusiveMaximum"] - step)
    if math.isinf(lo) and math.isinf(hi):
        return 0.0, 100.0
    if math.isinf(lo):
        return hi - 100.0, hi
    if math.isinf(hi):
        return lo, lo + 100.0
    return lo, hi


def instance_for(schema: Any, seed: int) -> Any:
    """A value valid against ``schema``, the same for the same seed."""
    return _Generator(schema, seed).value(schema)


# Values of each JSON type, and the schema types that would accept them.
_WRONG_VALUES: tuple[tuple[Any, set[str]], ...] = (
    ("not a number", {"string"}), (1.5, {"number"}), (True, {"boolean"}),
    ([1, 2], {"array"}), ({"unexpected": 1}, {"object"}),
)


def _wrong_value(s: Any) -> Any | None:
    allowed = s.get("type") if isinstance(s, dict) else None
    if allowed is None or any(k in s for k in ("enum", "const", "anyOf", "oneOf", "$ref")):
        return None
    allowed = {allowed} if isinstance(allowed, str) else set(allowed)
    return next((v for v, types in _WRONG_VALUES if not types & allowed), None)


def invalid_instance(schema: Any, seed: int) -> Any | None:
    """JSON that breaks ``schema``, or None when none is easy to make (then: broken JSON).

    A required property is dropped or given a wrong type; a scalar root gets a wrong type.
    """
    gen = _Generator(schema, seed)
    root = gen.resolve(schema["$ref"]) if isinstance(schema, dict) and "$ref" in schema \
        else schema
    value = gen.value(root)
    if isinstance(value, dict) and isinstance(root, dict):
        required = [k for k in root.get("required", []) if k in value]
        if required:
            key = gen.rng.choice(required)
            wrong = _wrong_value(root.get("properties", {}).get(key))
            if wrong is not None and gen.rng.random() < 0.5:
                return {**value, key: wrong}
            return {k: v for k, v in value.items() if k != key}
    return _wrong_value(root)


def broken_json(text: str) -> str:
    """Text that no JSON parser accepts: a strict prefix of an object or array never is."""
    if text[:1] in ("{", "[") and len(text) > 1:
        return text[: len(text) // 2]
    return "Sure! Here is the JSON you asked for: " + text


def draw_fate(u: float, invalid_json_rate: float, truncate_rate: float) -> str:
    """The fate of one answer from a uniform draw ``u``; half the invalid ones are not JSON."""
    if u < invalid_json_rate / 2:
        return "broken_json"
    if u < invalid_json_rate:
        return "schema_violation"
    if u < invalid_json_rate + truncate_rate:
        return "truncated"
    return "ok"


def _cut_to_tokens(text: str, max_tokens: int, count: Callable[[str], int]) -> str:
    """The longest prefix of ``text`` of at most ``max_tokens`` tokens (binary search)."""
    lo, hi = 0, len(text)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(text[:mid]) <= max_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def structured_answer(schema: Any, seed: int, fate: str, max_tokens: int,
                      count_tokens: Callable[[str], int]) -> tuple[str, int, str]:
    """(content, completion_tokens, finish_reason) of a structured answer of ``fate``.

    Like a real model, an answer longer than ``max_tokens`` is cut there with
    finish_reason "length", whatever its fate.
    """
    text = _compact(instance_for(schema, seed))
    finish = "stop"
    if fate == "schema_violation":
        bad = invalid_instance(schema, seed)
        text = _compact(bad) if bad is not None else broken_json(text)
    elif fate == "broken_json":
        text = broken_json(text)
    elif fate == "truncated":
        text, finish = text[: max(1, len(text) // 2)], "length"
    n = count_tokens(text)
    if n > max_tokens:
        text, finish = _cut_to_tokens(text, max_tokens, count_tokens), "length"
        n = count_tokens(text)
    return text, n, finish
