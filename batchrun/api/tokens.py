"""Offline token counting for rate limits, budgets and estimates.

tiktoken downloads its BPE files at first use, which fails on air-gapped hosts;
``bpe-openai`` ships the same files (cl100k_base, o200k_base; token ids equal to
tiktoken's). OpenAI models use their own encoding; every other model (Claude,
Gemini, DeepSeek, a self-hosted Llama) is estimated with cl100k_base, which is
within a few percent for English and code and is documented as an estimate.

The chat framing follows OpenAI's cookbook: 3 tokens per message plus the role,
and 3 to prime the answer. The simulated provider bills with the same function,
so estimates and bills can be compared exactly in tests.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

__all__ = ["count_chat_tokens", "count_text_tokens", "encoding_name_for"]

_TOKENS_PER_MESSAGE = 3
_TOKENS_TO_PRIME_REPLY = 3


def encoding_name_for(model: str) -> str:
    """The BPE encoding used for ``model``: its own for OpenAI models, else cl100k_base."""
    import bpe_openai

    try:
        return str(bpe_openai.encoding_name_for_model(model))
    except (KeyError, ValueError, bpe_openai.UnsupportedModelError):
        return "cl100k_base"


@lru_cache(maxsize=8)
def _encoding(name: str) -> Any:
    import bpe_openai  # imported lazily: commcheck and the CLI's --help need none of it

    return bpe_openai.get_encoding(name)


@lru_cache(maxsize=64)
def _encoding_for_model(model: str) -> Any:
    return _encoding(encoding_name_for(model))


def count_text_tokens(text: str, model: str = "gpt-4.1") -> int:
    """Tokens of a plain string; special-token text is counted as ordinary text."""
    return len(_encoding_for_model(model).encode_ordinary(text))


def count_chat_tokens(messages: list[dict[str, Any]], model: str = "gpt-4.1") -> int:
    """Prompt tokens of a chat request, as the provider bills them."""
    enc = _encoding_for_model(model)
    n = _TOKENS_TO_PRIME_REPLY
    for m in messages:
        n += _TOKENS_PER_MESSAGE
        for key in ("role", "content", "name"):
            value = m.get(key)
            if isinstance(value, str):
                n += len(enc.encode_ordinary(value))
            elif isinstance(value, list):  # content parts: text, images (OpenAI's rule)
                n += _parts_tokens(enc, value)
    return n


def _parts_tokens(enc: Any, parts: list[Any]) -> int:
    from batchrun.api.images import part_tokens

    n = 0
    for p in parts:
        text = p.get("text") if isinstance(p, dict) else None
        n += len(enc.encode_ordinary(text)) if isinstance(text, str) else part_tokens(p)
    return n
