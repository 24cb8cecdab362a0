"""Helpers shared by the CLI commands."""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

F = TypeVar("F", bound=Callable)


def user_errors(fn: F) -> F:
    """Turn a UserError (or a missing file) into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from exporters.errors import UserError

        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        except FileNotFoundError as e:
            typer.echo(f"error: file not found: {e.filename or e}", err=True)
            sys.exit(2)

    return wrapper  # type: ignore[return-value]
