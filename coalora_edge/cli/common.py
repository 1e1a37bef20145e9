"""What every command shares: one-line errors with exit codes, and `--json` output."""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

from coalora_edge.errors import CoaloraError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: exit code for a problem with the user's input (missing file, bad option, bad data)
EXIT_USAGE = 2


def one_line_errors(command: F) -> F:
    """Turn the library's typed errors into `error: ...` on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CoaloraError as e:
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USAGE) from None

    return wrapper  # type: ignore[return-value]


def print_json(obj: Any) -> None:
    """One JSON object on stdout, nothing else: scripts and benchmarks read it."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def split_list(value: str | None) -> list[str] | None:
    """`--choices Q4_K,Q8_0` -> ["Q4_K", "Q8_0"]."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None
