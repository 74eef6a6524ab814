"""What the simulated provider answers on each request route, free of I/O.

A *route* parses a request body (or raises ``protocol.BadRequest``), says what the rate
limiter weighs it at and what the ledger keys it by, and builds the 200 answer. The
online handler (``app.kind_handler``) and the batch lines (``batches.py``) both use it,
so a line is answered exactly as the same request online would be.

    /v1/chat/completions   ChatRoute        (``protocol.answer_request``)
    /v1/embeddings         EmbeddingsRoute  deterministic unit vectors from the input's
                                            hash; float or base64; ``dimensions``; usage
                                            counted with the same tokenizer as the client
    /v1/responses          ResponsesRoute   the chat answer, as a Responses API object;
                                            ``incomplete`` when cut at max_output_tokens;
                                            json_schema through ``text.format``
"""

from __future__ import annotations

import binascii
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import orjson

from batchrun.api.tokens import count_chat_tokens, count_text_tokens
from batchrun.sim.config import MockConfig
from batchrun.sim.ledger import prompt_key
from batchrun.sim.protocol import (
    BadRequest,
    ChatRequest,
    answer_request,
    completion_body,
    parse_chat_request,
)

__all__ = ["ROUTES", "ChatRoute", "EmbeddingsRoute", "ResponsesRoute", "SimRoute",
           "embedding_vector", "embedding_vectors"]

_MAX_INPUTS = 2048
_MAX_INPUT_TOKENS = 8192
_NATIVE_DIMS = {"text-embedding-3-large": 3072}
_DEFAULT_DIMS = 1536
_DEFAULT_OUTPUT = 4096  # max_output_tokens is optional in the Responses API


@dataclass(frozen=True)
class Answer:
    body: bytes
    completion_tokens: int


class SimRoute(Protocol):
    url: str

    def parse(self, body: Any) -> Any: ...
    def key(self, req: Any) -> str: ...
    def prompt_tokens(self, req: Any) -> int: ...
    def max_output(self, req: Any) -> int: ...
    def answer(self, req: Any, key: str, ptok: int, config: MockConfig, seq: int,
               ident: str, created: int) -> Answer: ...


class ChatRoute:
    url = "/v1/chat/completions"

    def parse(self, body: Any) -> ChatRequest:
        return parse_chat_request(body)

    def key(self, req: ChatRequest) -> str:
        return prompt_key(req.messages)

    def prompt_tokens(self, req: ChatRequest) -> int:
        return count_chat_tokens(req.messages, req.model)

    def max_output(self, req: ChatRequest) -> int:
        return req.max_tokens

    def answer(self, req: ChatRequest, key: str, ptok: int, config: MockConfig, seq: int,
               ident: str, created: int) -> Answer:
        content, ctok, finish = answer_request(req, key, config=config, seq=seq)
        return Answer(completion_body(f"chatcmpl-{ident}", created, req.model, content, finish,
                                      ptok, ctok), ctok)


# -- embeddings ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddingsRequest:
    model: str
    inputs: list[str]
    encoding_format: str
    dimensions: int


def embedding_vectors(texts: list[str], dims: int) -> np.ndarray:
    """The unit vectors the simulated provider answers for ``texts``, one row each: a
    function of the text (bytes of its SHAKE-128 digest, centred), computed for the whole
    request at once, so the provider is not the bottleneck of a benchmark."""
    raw = b"".join(hashlib.shake_128(t.encode("utf-8")).digest(dims) for t in texts)
    v = np.frombuffer(raw, dtype=np.uint8).reshape(len(texts), dims).astype(np.float32)
    v -= np.float32(127.5)
    v /= np.sqrt(np.einsum("ij,ij->i", v, v))[:, None]
    return v


def embedding_vector(text: str, dims: int) -> np.ndarray:
    """The vector answered for one ``text`` (what tests compare results with)."""
    return embedding_vectors([text], dims)[0]


class EmbeddingsRoute:
    url = "/v1/embeddings"

    def parse(self, body: Any) -> EmbeddingsRequest:
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not inputs or not all(
                isinstance(x, str) and x for x in inputs):
            raise BadRequest("'$.input' is invalid: give a non-empty string or a list of "
                             "non-empty strings.", "input")
        if len(inputs) > _MAX_INPUTS:
            raise BadRequest(f"'$.input' holds {len(inputs)} inputs; at most {_MAX_INPUTS}.",
                             "input")
        fmt = body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise BadRequest("Invalid 'encoding_format': expected 'float' or 'base64'.",
                             "encoding_format")
        native = _NATIVE_DIMS.get(model, _DEFAULT_DIMS)
        dims = body.get("dimensions", native)
        if isinstance(dims, bool) or not isinstance(dims, int) or not 0 < dims <= native:
            raise BadRequest(f"Invalid 'dimensions': expected 1 to {native}.", "dimensions")
        for x in inputs:  # OpenAI refuses the whole request for one input too long
            if len(x) > _MAX_INPUT_TOKENS and count_text_tokens(x, model) > _MAX_INPUT_TOKENS:
                raise BadRequest(f"This model's maximum context length is {_MAX_INPUT_TOKENS} "
                                 "tokens; an input is longer.", "input")
        return EmbeddingsRequest(model, inputs, fmt, dims)

    def key(self, req: EmbeddingsRequest) -> str:
        return prompt_key(req.inputs)

    def prompt_tokens(self, req: EmbeddingsRequest) -> int:
        return sum(count_text_tokens(x, req.model) for x in req.inputs)

    def max_output(self, req: EmbeddingsRequest) -> int:
        return 0

    def answer(self, req: EmbeddingsRequest, key: str, ptok: int, config: MockConfig,
               seq: int, ident: str, created: int) -> Answer:
        vectors = embedding_vectors(req.inputs, req.dimensions).astype("<f4")
        values: list[Any] = ([binascii.b2a_base64(v, newline=False).decode("ascii")
                              for v in vectors]
                             if req.encoding_format == "base64" else vectors.tolist())
        data = [{"object": "embedding", "index": i, "embedding": value}
                for i, value in enumerate(values)]
        doc = {"object": "list", "data": data, "model": req.model,
               "usage": {"prompt_tokens": ptok, "total_tokens": ptok}}
        # up to 2,048 vectors of up to 3,072 floats: orjson writes it 4x faster than json
        return Answer(orjson.dumps(doc), 0)


# -- the Responses API --------------------------------------------------------------------


def _text_of(content: Any) -> Any:
    """A Responses input item's content as chat content: text parts joined."""
    if isinstance(content, list):
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        return "".join(t for t in texts if isinstance(t, str))
    return content


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    raw = body.get("input")
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    if not isinstance(items, list) or not items:
        raise BadRequest("Missing required parameter: 'input'.", "input")
    msgs = []
    if isinstance(body.get("instructions"), str):
        msgs.append({"role": "system", "content": body["instructions"]})
    for i, m in enumerate(items):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise BadRequest(f"Invalid 'input[{i}]': expected a message with role and "
                             "content.", f"input[{i}]")
        msgs.append({"role": m["role"], "content": _text_of(m["content"])})
    return msgs


def _format(body: dict[str, Any]) -> dict[str, Any] | None:
    """``text.format`` as chat's ``response_format`` (the answers are the same)."""
    fmt = (body.get("text") or {}).get("format") if isinstance(body.get("text"), dict) else None
    if fmt is None or fmt.get("type") != "json_schema":
        return None
    if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema", {}), dict):
        raise BadRequest("Invalid 'text.format': json_schema needs a name and a schema.",
                         "text.format")
    return {"type": "json_schema", "json_schema": {"name": fmt["name"],
                                                   "schema": fmt.get("schema", {})}}


class ResponsesRoute:
    url = "/v1/responses"

    def parse(self, body: Any) -> ChatRequest:
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("you must provide a model parameter", "model")
        limit = body.get("max_output_tokens", _DEFAULT_OUTPUT)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0:
            raise BadRequest("Invalid 'max_output_tokens': expected an integer greater than 0.",
                             "max_output_tokens")
        return ChatRequest(model, _messages(body), limit, _format(body))

    def key(self, req: ChatRequest) -> str:
        return prompt_key(req.messages)

    def prompt_tokens(self, req: ChatRequest) -> int:
        return count_chat_tokens(req.messages, req.model)

    def max_output(self, req: ChatRequest) -> int:
        return req.max_tokens

    def answer(self, req: ChatRequest, key: str, ptok: int, config: MockConfig, seq: int,
               ident: str, created: int) -> Answer:
        content, ctok, finish = answer_request(req, key, config=config, seq=seq)
        cut = finish == "length"
        status = "incomplete" if cut else "completed"
        doc = {
            "id": f"resp_{ident}", "object": "response", "created_at": created,
            "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": None, "max_output_tokens": req.max_tokens, "model": req.model,
            "output": [{"type": "message", "id": f"msg_{ident}", "status": status,
                        "role": "assistant", "content": [
                            {"type": "output_text", "text": content, "annotations": []}]}],
            "parallel_tool_calls": True, "temperature": 1.0, "top_p": 1.0,
            "tool_choice": "auto", "tools": [], "metadata": {},
            "text": {"format": {"type": "json_schema" if req.response_format else "text"}},
            "usage": {"input_tokens": ptok, "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": ctok, "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": ptok + ctok},
        }
        return Answer(json.dumps(doc, separators=(",", ":")).encode(), ctok)


ROUTES: dict[str, SimRoute] = {r.url: r for r in (ChatRoute(), EmbeddingsRoute(),
                                                   ResponsesRoute())}
