"""Long work shows progress off a terminal too: a plain line every few seconds."""

import io

from rich.console import Console
from rich.progress import TextColumn

from coalora_edge.progress import LoggedProgress
from coalora_edge.training.trainer import progress_bar


def _run(log_every: float, terminal: bool, steps: int = 3) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    bar = LoggedProgress(TextColumn("{task.description} {task.completed}/{task.total}"), console=console,
                         log_every=log_every)
    task = bar.add_task("pretraining", total=steps)
    with bar:
        for _ in range(steps):
            bar.advance(task)
    return out.getvalue()


def test_off_a_terminal_a_line_per_interval():
    lines = _run(log_every=0, terminal=False).splitlines()
    assert [line for line in lines if line.strip()][:3] == ["pretraining 1/3", "pretraining 2/3", "pretraining 3/3"]


def test_the_interval_holds_lines_back_and_a_terminal_gets_the_live_bar():
    assert _run(log_every=3600, terminal=False).split() == ["pretraining", "3/3"]  # Rich's final frame only
    assert "\x1b[" in _run(log_every=0, terminal=True)  # on a terminal Rich draws it live


def test_training_uses_it():
    bar, advance = progress_bar(2, 512)
    assert isinstance(bar, LoggedProgress)
