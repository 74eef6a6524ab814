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

from collections.abc import Callable
from functools import lru_cache
from typing import Any

__all__ = ["count_chat_tokens", "count_text_tokens", "encoding_name_for"]

_TOKENS_PER_MESSAGE = 3
_TOKENS_TO_PRIME_REPLY = 3
_SLOW_PATH_CHARS = 1_000_000  # bpe_openai refuses longer texts: keep its error


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


@lru_cache(maxsize=64)
def _counter(model: str) -> Callable[[str], int]:
    """The fastest exact count for ``model``: the Rust tokenizer's own ``count`` (half the
    time of ``encode_ordinary``, which builds the token list), else the length of that.

    Unlike ``encode_ordinary``, ``count`` has no 200,000-token chunk limit: a text that
    long gets its count (an input over a model's limit is then that row's error, as the
    kinds check it) where ``encode_ordinary`` raised out of the shard reader."""
    enc = _encoding_for_model(model)

    def slow(text: str) -> int:
        return len(enc.encode_ordinary(text))

    try:
        from bpe_openai._bindings import tokenizer_for_encoding

        fast = tokenizer_for_encoding(enc.name).count
    except (ImportError, AttributeError, ValueError):
        return slow

    def count(text: str) -> int:
        if len(text) >= _SLOW_PATH_CHARS:
            return slow(text)  # its guards: a lone surrogate, a text too long to encode
        try:
            return int(fast(text))
        except (UnicodeEncodeError, ValueError):
            return slow(text)

    return count


def count_text_tokens(text: str, model: str = "gpt-4.1") -> int:
    """Tokens of a plain string; special-token text is counted as ordinary text."""
    return _counter(model)(text)


def count_chat_tokens(messages: list[dict[str, Any]], model: str = "gpt-4.1") -> int:
    """Prompt tokens of a chat request, as the provider bills them."""
    count = _counter(model)
    n = _TOKENS_TO_PRIME_REPLY
    for m in messages:
        n += _TOKENS_PER_MESSAGE
        for key in ("role", "content", "name"):
            value = m.get(key)
            if isinstance(value, str):
                n += count(value)
            elif isinstance(value, list):  # content parts: text, images (OpenAI's rule)
                n += _parts_tokens(count, value)
    return n


def _parts_tokens(count: Callable[[str], int], parts: list[Any]) -> int:
    from batchrun.api.images import part_tokens

    n = 0
    for p in parts:
        text = p.get("text") if isinstance(p, dict) else None
        n += count(text) if isinstance(text, str) else part_tokens(p)
    return n
