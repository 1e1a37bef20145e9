"""Progress of long work: Rich's live bar on a terminal, a plain line every few seconds
elsewhere (a log file, CI, `nohup`), where Rich draws only the final state and minutes of
pretraining or training would pass in silence."""

from __future__ import annotations

import time
from typing import Any

from rich.progress import Progress, TaskID

#: seconds between the plain lines printed when the output is not a terminal
LOG_EVERY = 10.0


class LoggedProgress(Progress):
    """A ``rich.progress.Progress`` that, off a terminal, prints its tasks' row as one line
    at most every ``log_every`` seconds of updates."""

    def __init__(self, *columns: Any, log_every: float = LOG_EVERY, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self.log_every = log_every
        self._logged = time.monotonic()

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        if self.disable or self.console.is_terminal or time.monotonic() - self._logged < self.log_every:
            return
        self._logged = time.monotonic()
        self.console.print(self.make_tasks_table(self.tasks), soft_wrap=True)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        self.update(task_id, advance=advance)
