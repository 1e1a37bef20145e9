"""The `coalora-edge` entry point. The commands (cli/commands.py) import torch, transformers and
the runtimes, seconds of start-up: they load inside ``main``'s error handling, so Ctrl-C
or a broken install during start-up ends in one line too."""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 130  # cli/common.py's EXIT_CODES, before anything is imported
_signals: list[int] = []  # the interrupts received, for errors a library made of one


def _interrupt(signum: int, frame: object) -> None:
    _signals.append(signum)
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. Bugs also end in one line; COALORA_DEBUG=1 shows the traceback."""
    # `kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed and a replaced
    # output comes back; Python's default would end the process on the spot.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        from coalora_edge.cli.commands import app

        app()
    except KeyboardInterrupt:
        _exit_interrupted()
    except Exception as e:  # a bug, not bad input: say so and how to report it
        if _signals:  # a Ctrl-C inside a library's import can surface as another error (numpy's ImportError)
            _exit_interrupted()
        if os.environ.get("COALORA_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with COALORA_DEBUG=1 for the traceback and report it)",
              file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


def _exit_interrupted() -> None:
    """Exit 130 at once: outputs were cleaned up while the stack unwound. Not sys.exit: a
    Ctrl-C that lands inside an import can leave the interpreter to re-raise SIGINT at
    shutdown (measured: 3 in 12 start-ups ended by the signal, exit -2, not 130)."""
    print("interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def __getattr__(name: str) -> object:
    """``coalora_edge.cli.app`` (the Typer app, for CliRunner), imported on first use."""
    if name == "app":
        from coalora_edge.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
