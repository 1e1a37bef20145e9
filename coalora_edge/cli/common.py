"""What every command shares: one-line errors with exit codes, and `--json` output."""

from __future__ import annotations

import errno
import functools
import json
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from coalora_edge.errors import CoaloraError

try:  # typer vendors click from 0.2x on; before, click is a package of its own
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer
    from click.exceptions import UsageError

console = Console()
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Every way a command ends, by exit code (README, "Exit codes"). Errors carry their own
#: code (errors.py: ``exit_code``); the rest are the CLI's.
EXIT_CODES = {
    0: "success",
    1: "internal error: a bug in coalora-edge (report it; COALORA_DEBUG=1 shows the traceback)",
    2: "usage: the command line does not parse (unknown option, value out of range, missing argument)",
    3: "bad input: a file, model, text, profile, bundle or setting that cannot be used as given",
    4: "verification failed: the export does not compute the trained model in its runtime; nothing was written",
    5: "runtime missing: llama.cpp (llama-cpp-python) or ONNX Runtime is absent or lacks what is needed",
    6: "not enough memory or disk for the job",
    130: "interrupted (Ctrl-C or SIGTERM); temporary outputs removed",
}
EXIT_USAGE, EXIT_RESOURCES = 2, 6
#: errno values of a full disk or quota; safetensors (Rust) reports them only in its message
DISK_FULL = {errno.ENOSPC, errno.EDQUOT}


def print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)


def disk_full(error: Exception) -> bool:
    if isinstance(error, OSError):
        return error.errno in DISK_FULL
    return type(error).__name__ == "SafetensorError" and any(f"(os error {n})" in str(error) for n in DISK_FULL)


def one_line_errors(command: F) -> F:
    """Turn the library's typed errors into `error: ...` on stderr and a non-zero exit."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CoaloraError as e:
            print_error(str(e))
            raise typer.Exit(e.exit_code) from None
        except Exception as e:
            if not disk_full(e):
                raise
            # the disk filled after the up-front space check; outputs are atomic, so nothing partial is left
            where = f" (writing {e.filename})" if getattr(e, "filename", None) else ""
            print_error(f"the disk is full{where}: free space or write to another disk, then run the command again")
            raise typer.Exit(EXIT_RESOURCES) from None

    return wrapper  # type: ignore[return-value]


class OneLineUsageErrors(TyperGroup):
    """Command-line mistakes (an unknown option, a value out of range, a missing argument)
    end like every other bad input: one line naming the problem, and where the fix is.
    Without this, click prints the usage and a framed message over five lines."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as e:
            # A group called without a command shows its help: that is what was asked for.
            if type(e).__name__ == "NoArgsIsHelpError":
                raise
            where = (e.ctx or ctx).command_path
            print_error(f"{e.format_message().rstrip('.')}; see {where} --help")
            raise typer.Exit(EXIT_USAGE) from None


def print_json(obj: Any) -> None:
    """One JSON object on stdout, nothing else: scripts and benchmarks read it."""
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def split_list(value: str | None, option: str) -> list[str] | None:
    """`--choices Q4_K,Q8_0` -> ["Q4_K", "Q8_0"]; None when the option is not given. An empty
    list or an empty item (`3,,4`) is a typo, not a request for the default."""
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")]
    if not all(items):
        raise typer.BadParameter(f"expected a comma-separated list without empty items, got {value!r}",
                                 param_hint=f"'{option}'")
    return items
