"""The entry point: the commands' heavy imports load inside its error handling."""

import subprocess
import sys

import pytest

#: a child that presses Ctrl-C on itself the moment ``module`` starts to import during the
#: CLI's start-up (deterministic: a sleep before the signal raced with start-up in CI)
CHILD = """
import os, signal, sys
import coalora_edge.cli as cli

class PressCtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, PressCtrlC())
sys.argv = ["coalora-edge", "--help"]
cli.main()
"""


@pytest.mark.parametrize("module", ["torch", "scipy", "gguf", "pydantic"])
def test_ctrl_c_during_start_up_is_one_line_and_exit_code_130(module):
    done = subprocess.run([sys.executable, "-c", CHILD.format(module=module)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted", (done.returncode, done.stderr[-2000:])
    assert "Usage" not in done.stdout  # it was stopped before --help ran


def test_the_app_is_importable_from_the_package():
    from coalora_edge.cli import app
    from coalora_edge.cli.commands import app as commands_app

    assert app is commands_app
