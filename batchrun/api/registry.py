"""Which request kind and which provider a job uses: one line each to add another.

A new request kind (embeddings, the Responses API) is one module implementing
``protocols.RequestKind`` and one entry in ``KINDS``; a new provider (Anthropic) is one
module implementing ``protocols.Provider`` and one entry in ``PROVIDERS``.
"""

from __future__ import annotations

from typing import TypeVar

from batchrun.api.chat import ChatKind
from batchrun.api.embeddings import EmbeddingsKind
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
PROVIDERS: dict[str, Provider] = {OpenAIProvider.api: OpenAIProvider()}


def kind_for(spec: JobSpec) -> RequestKind:
    """The request kind of the spec's ``task``; an unknown one, or a spec holding fields the
    kind cannot send (its optional ``check_spec``), is a spec error."""
    kind = _known(KINDS, spec.task, "task")
    if is_raw_input(spec):  # no prompt source: the lines of an OpenAI batch input file
        kind = RawBodyKind(kind)
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
