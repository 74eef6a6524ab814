"""Which request kind and which provider a job uses: one line each to add another.

A new request kind (embeddings, the Responses API) is one module implementing
``protocols.RequestKind`` and one entry in ``KINDS``; a new provider (Anthropic) is one
module implementing ``protocols.Provider`` and one entry in ``PROVIDERS``.
"""

from __future__ import annotations

from typing import TypeVar

from batchrun.api.anthropic import AnthropicProvider
from batchrun.api.chat import ChatKind
from batchrun.api.embeddings import EmbeddingsKind
from batchrun.api.gemini import GeminiProvider
from batchrun.api.openai import OpenAIProvider
from batchrun.api.protocols import Provider, RequestKind
from batchrun.api.rawbody import RawBodyKind, is_raw_input
from batchrun.api.responses import ResponsesKind
from batchrun.errors import SpecError
from batchrun.spec import JobSpec

T = TypeVar("T")

__all__ = ["KINDS", "PROVIDERS", "kind_for", "provider_for"]

KINDS: dict[str, RequestKind] = {ChatKind.task: ChatKind()}
KINDS[EmbeddingsKind.task] = EmbeddingsKind()
KINDS[ResponsesKind.task] = ResponsesKind()
PROVIDERS: dict[str, Provider] = {OpenAIProvider.api: OpenAIProvider(),
                                  AnthropicProvider.api: AnthropicProvider(),
                                  GeminiProvider.api: GeminiProvider()}


def kind_for(spec: JobSpec) -> RequestKind:
    """The request kind of the spec's ``task``, as the spec's provider speaks it; an unknown
    one, one the provider does not serve, or a spec holding fields the kind cannot send (its
    optional ``check_spec``), is a spec error."""
    provider = provider_for(spec)
    kind = _known(KINDS, spec.task, "task")
    if is_raw_input(spec):  # no prompt source: the lines of an OpenAI batch input file
        if provider.api != OpenAIProvider.api:  # its bodies are in OpenAI's shape
            raise SpecError(f"an OpenAI batch input file runs on endpoint.api: openai, not "
                            f"{provider.api}; name a prompt source (prompt_column, "
                            "messages_column or prompt_template) instead")
        kind = RawBodyKind(kind)
    kind = provider.adapt(kind, spec)
    check = getattr(kind, "check_spec", None)
    if check is not None:
        check(spec)
    return kind


def provider_for(spec: JobSpec) -> Provider:
    """The provider of the spec's ``endpoint.api``; an unknown one is a spec error."""
    return _known(PROVIDERS, spec.endpoint.api, "endpoint.api")


def _known(table: dict[str, T], name: str, field: str) -> T:
    try:
        return table[name]
    except KeyError:
        raise SpecError(f"{field}: unknown {name!r}; use one of: {', '.join(sorted(table))}"
                        ) from None
