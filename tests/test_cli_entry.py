"""The entry point: the commands' heavy imports load inside its error handling."""

import signal
import subprocess
import sys
import time

import pytest


@pytest.mark.parametrize("delay", [0.3, 0.6, 1.0])  # inside different imports: torch, numpy, transformers
def test_ctrl_c_during_start_up_is_one_line_and_exit_code_130(delay):
    process = subprocess.Popen([sys.executable, "-m", "coalora_edge", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    time.sleep(delay)  # torch and transformers take seconds to import: still starting up
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and err.strip() == "interrupted", (process.returncode, err)
    assert "Usage" not in out  # it was stopped before --help ran


def test_the_app_is_importable_from_the_package():
    from coalora_edge.cli import app
    from coalora_edge.cli.commands import app as commands_app

    assert app is commands_app
