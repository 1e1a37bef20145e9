"""The `coalora-edge` entry point. The commands (cli/commands.py) import torch, transformers and
the runtimes, seconds of start-up: they load inside ``main``'s error handling, so Ctrl-C
or a broken install during start-up ends in one line too."""

from __future__ import annotations

import os
import signal
import sys

EXIT_INTERNAL, EXIT_INTERRUPTED = 1, 130  # cli/common.py's EXIT_CODES, before anything is imported


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    """Entry point. Bugs also end in one line; COALORA_DEBUG=1 shows the traceback."""
    # `kill` (SIGTERM) unwinds like Ctrl-C, so temporary outputs are removed and a replaced
    # output comes back; Python's default would end the process on the spot.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        from coalora_edge.cli.commands import app

        app()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as e:  # a bug, not bad input: say so and how to report it
        if os.environ.get("COALORA_DEBUG"):
            raise
        print(f"internal error: {type(e).__name__}: {e} (rerun with COALORA_DEBUG=1 for the traceback and report it)",
              file=sys.stderr)
        sys.exit(EXIT_INTERNAL)


def __getattr__(name: str) -> object:
    """``coalora_edge.cli.app`` (the Typer app, for CliRunner), imported on first use."""
    if name == "app":
        from coalora_edge.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
