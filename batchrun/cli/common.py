"""What every command of the CLI shares: one line per error, its exit code, logging.

Every ``BatchrunError`` becomes one line on stderr and the error's exit code
(2 for bad input), with no traceback; anything else is a bug and shows one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from batchrun.errors import BatchrunError

__all__ = ["EXIT_INTERNAL", "EXIT_INTERRUPTED", "clean_errors", "err_console", "setup_logging"]

err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
EXIT_INTERNAL = 1  # a BatchrunError without a code of its own: a bug, please report it
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def clean_errors(fn: F) -> F:
    """Turn batchrun's own errors into one line and an exit code."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BatchrunError as e:  # escaped: a glob's [ab] in a message is not markup
            err_console.print(f"[red]batchrun: error:[/red] {escape(str(e))}",
                              highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(e, "exit_code", EXIT_INTERNAL)) from None
        except KeyboardInterrupt:
            err_console.print("batchrun: interrupted; what was written is kept: run the same "
                              "command again to resume", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
    return wrapper  # type: ignore[return-value]


def setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err_console, show_path=False)])
