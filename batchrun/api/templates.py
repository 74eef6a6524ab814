"""Prompt templates: ``prompt_template`` and a templated ``system_prompt``, in Jinja2.

The environment is sandboxed (a template cannot reach Python internals: specs travel
between people) and undefined names are errors (``StrictUndefined``), so a typo in a
column name fails the job before Ray starts rather than sending empty prompts. The
variables are the row's columns; ``columns`` lists the ones a template names, which
the input check (``io/shards.validate_input``) requires and the reader reads.

A ``system_prompt`` is a template only if it holds ``{{`` or ``{%``: a plain one stays a
fixed string, sent as written.
"""

from __future__ import annotations

from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from batchrun.errors import SpecError
from batchrun.spec import JobSpec

__all__ = ["Templates", "is_template", "template_columns"]


def is_template(text: str | None) -> bool:
    return text is not None and ("{{" in text or "{%" in text)


def _env() -> SandboxedEnvironment:
    return SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                keep_trailing_newline=True)


class Templates:
    """The job's compiled templates; ``of(spec)`` is None when it has none."""

    def __init__(self, prompt: str | None, system: str | None):
        env = _env()
        self.columns: list[str] = []
        self._prompt = self._compile(env, prompt, "prompt_template")
        self._system = self._compile(env, system, "system_prompt")

    @classmethod
    def of(cls, spec: JobSpec) -> Templates | None:
        system = spec.system_prompt if is_template(spec.system_prompt) else None
        if spec.prompt_template is None and system is None:
            return None
        return cls(spec.prompt_template, system)

    def _compile(self, env: SandboxedEnvironment, source: str | None, field: str
                 ) -> jinja2.Template | None:
        if source is None:
            return None
        try:
            names = meta.find_undeclared_variables(env.parse(source))
            template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise SpecError(f"{field}: template syntax error at line {e.lineno}: {e.message}; "
                            "fix the template") from None
        self.columns += sorted(n for n in names if n not in self.columns)
        return template

    @property
    def has_prompt(self) -> bool:
        return self._prompt is not None

    @property
    def has_system(self) -> bool:
        return self._system is not None

    @staticmethod
    def _render(template: jinja2.Template, row: dict[str, Any]) -> tuple[str | None, str | None]:
        try:
            return template.render(row), None
        except jinja2.TemplateError as e:  # e.g. an attribute of a null value: the row's own
            return None, f"template: {type(e).__name__}: {e}"[:300]
        except (TypeError, ValueError, ArithmeticError) as e:
            return None, f"template: {type(e).__name__}: {e}"[:300]

    def prompt(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        """(the rendered prompt, None) or (None, the row's error)."""
        assert self._prompt is not None
        return self._render(self._prompt, row)

    def system(self, row: dict[str, Any]) -> tuple[str | None, str | None]:
        assert self._system is not None
        return self._render(self._system, row)


def template_columns(spec: JobSpec) -> list[str]:
    """The columns the spec's templates name (a syntax error is a ``SpecError``)."""
    t = Templates.of(spec)
    return t.columns if t is not None else []
