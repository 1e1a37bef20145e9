"""The `coalora-edge` command line: one module per subcommand, registered here."""

from __future__ import annotations

import os
import signal
import sys

import typer

from coalora_edge.cli.common import EXIT_INTERNAL, EXIT_INTERRUPTED, OneLineUsageErrors, err_console
from coalora_edge.cli.demo import demo
from coalora_edge.cli.env import env
from coalora_edge.cli.eval import eval
from coalora_edge.cli.export import export
from coalora_edge.cli.inspect import inspect
from coalora_edge.cli.pareto import pareto
from coalora_edge.cli.profiles import profiles_app
from coalora_edge.cli.resolve import resolve
from coalora_edge.cli.run import run
from coalora_edge.cli.train import train

app = typer.Typer(
    name="coalora-edge",
    cls=OneLineUsageErrors,
    help="Fine-tune a quantized LLM once, run it on every device (CoA-LoRA -> llama.cpp / ONNX Runtime).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _group() -> None:
    """Fine-tune a quantized LLM once, run it on every device."""


app.command()(inspect)
app.command()(train)
app.command()(eval)
app.command()(pareto)
app.add_typer(profiles_app, name="profiles")
app.command()(resolve)
app.command()(export)
app.command()(run)
app.command()(demo)
app.command()(env)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. Bugs also end in one line; COALORA_DEBUG=1 shows the traceback."""
    # `kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed and a replaced
    # output comes back; Python's default would end the process on the spot.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a bug, not bad input: say so and how to report it
        if os.environ.get("COALORA_DEBUG"):
            raise
        err_console.print(
            f"[bold red]internal error:[/] {type(e).__name__}: {e} "
            "(rerun with COALORA_DEBUG=1 for the traceback and report it)",
            highlight=False, soft_wrap=True,
        )
        sys.exit(EXIT_INTERNAL)
