"""The embeddings request kind (``task: embeddings``): ``POST /embeddings``.

Unlike chat, one request carries many rows: up to ``embedding.inputs_per_request``
texts in ``input``, and each comes back as one vector (``data[i].index`` says whose).
The engine groups rows (``online/grouped.py``) because this kind says how many a request
carries (``inputs_per_request``); batch mode sends one row per line (``input`` a string).

Vectors travel as base64 by default (what the official client asks for: a quarter of the
bytes of a JSON float list) and are decoded here into float32 arrays; ``float`` is the
other choice. The request's ``usage.prompt_tokens`` is shared out over its rows by their
offline token counts, so each row's ``prompt_tokens`` and ``cost_usd`` add up to the bill.
"""

from __future__ import annotations

import binascii
from typing import Any

import numpy as np
import pyarrow as pa

from batchrun.api.protocols import Completion
from batchrun.api.tokens import count_text_tokens
from batchrun.errors import RetryableError, SpecError
from batchrun.spec import JobSpec

__all__ = ["EMBEDDING_DIMENSIONS", "MAX_INPUT_TOKENS", "EmbeddingsKind", "share_tokens"]

# The vector size of known models when the spec sets no ``embedding.dimensions``: then the
# results' column is a fixed_size_list (else a list whose size the answers decide).
EMBEDDING_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072,
                        "text-embedding-ada-002": 1536}
# An input over this many tokens is refused by OpenAI's embedding models (the whole
# request, with 400): it is caught here, offline, as that row's own error.
MAX_INPUT_TOKENS = {"text-embedding-3-small": 8191, "text-embedding-3-large": 8191,
                    "text-embedding-ada-002": 8191}


def _base_model(model: str) -> str:
    return model.rsplit("/", 1)[-1].lower()


def share_tokens(counts: list[int], total: int) -> list[int]:
    """``total`` shared over rows in proportion to ``counts`` (offline counts), exactly."""
    known = sum(counts)
    if known == total or not counts:
        return list(counts)
    if known == 0:
        shares = [total // len(counts)] * len(counts)
    else:
        shares = [c * total // known for c in counts]
    shares[-1] += total - sum(shares)
    return shares


def _vector(value: Any) -> np.ndarray:
    if isinstance(value, str):  # base64 of little-endian float32, as OpenAI sends it
        return np.frombuffer(binascii.a2b_base64(value, strict_mode=True), dtype="<f4")
    if not isinstance(value, list):
        raise TypeError("embedding is neither a list nor base64")
    return np.asarray(value, dtype=np.float32)


def _vectors(values: list[Any]) -> list[np.ndarray]:
    """The answer's vectors as float32 arrays. All base64 of one size (one model, one
    ``dimensions``: the usual answer) they are rows of one 2-D array, decoded at once,
    which the worker turns into the results' column in one copy (``api/records.py``)."""
    if values and all(isinstance(v, str) for v in values):
        raw = [binascii.a2b_base64(v, strict_mode=True) for v in values]
        if len({len(r) for r in raw}) == 1:
            return list(np.frombuffer(b"".join(raw), dtype="<f4").reshape(len(raw), -1))
    return [_vector(v) for v in values]


class EmbeddingsKind:
    task = "embeddings"
    path = "/embeddings"

    def check_spec(self, spec: JobSpec) -> None:
        for name in ("response_format", "image_column", "messages_column", "system_prompt"):
            if getattr(spec, name) is not None:
                raise SpecError(f"task: embeddings takes no {name}; remove it (an embedding "
                                "is the vector of prompt_column's or prompt_template's text)")

    def inputs_per_request(self, spec: JobSpec) -> int:
        return spec.embedding.inputs_per_request

    def output_tokens(self, spec: JobSpec) -> int:
        return 0  # an embedding has no output tokens: TPM and budget count the input only

    def result_fields(self, spec: JobSpec) -> list[pa.Field]:
        dims = spec.embedding.dimensions or EMBEDDING_DIMENSIONS.get(_base_model(spec.model))
        typ = pa.list_(pa.float32(), dims) if dims else pa.list_(pa.float32())
        return [pa.field("embedding", typ)]

    def payload(self, spec: JobSpec, value: Any) -> tuple[str | None, str | None]:
        if not isinstance(value, str):
            return None, "null input"
        if not value.strip():
            return None, "empty input"
        limit = MAX_INPUT_TOKENS.get(_base_model(spec.model))
        # a token is at least one character: only a long text can be over the limit
        if limit is not None and len(value) > limit:
            n = count_text_tokens(value, spec.model)
            if n > limit:
                return None, f"input of {n} tokens is over {spec.model}'s limit of {limit}"
        return value, None

    def body(self, spec: JobSpec, payload: str | list[str], fields: dict[str, Any]
             ) -> dict[str, Any]:
        emb = spec.embedding
        body: dict[str, Any] = {"model": spec.model, "input": payload,
                                "encoding_format": emb.encoding_format}
        if emb.dimensions is not None:
            body["dimensions"] = emb.dimensions
        body.update(spec.generation.extra_body)  # e.g. `user`; no sampling fields here
        return body

    def parse(self, doc: Any) -> Completion:
        """One vector per input, in input order (``Completion.extra[i]["embedding"]``)."""
        try:
            data = sorted(doc["data"], key=lambda d: int(d["index"]))
            vectors = tuple({"embedding": v} for v in _vectors([d["embedding"] for d in data]))
            usage = doc.get("usage") or {}
            prompt = int(usage.get("prompt_tokens") or 0)
            return Completion(text=None, finish_reason=None, prompt_tokens=prompt,
                              completion_tokens=0,
                              total_tokens=int(usage.get("total_tokens") or prompt),
                              extra=vectors)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError,
                binascii.Error) as e:
            raise RetryableError(f"malformed response body ({type(e).__name__})", status=200,
                                 error_type="malformed_body", maybe_billed=True) from None

    def prompt_tokens(self, payload: str | list[str], model: str) -> int:
        if isinstance(payload, str):
            return count_text_tokens(payload, model)
        return sum(count_text_tokens(p, model) for p in payload)
