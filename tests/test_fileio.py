"""Outputs are whole or absent (fileio.py): replacing what is there, failing halfway, and
the temporaries a killed writer leaves behind."""

import os
import subprocess
import sys

import pytest

from coalora_edge.errors import OutputExistsError
from coalora_edge.fileio import atomic_dir, build_in_place, make_temp_dir, remove


def _fill(folder, text="new"):
    (folder / "model.gguf").write_text(text)


@pytest.mark.parametrize("builder", [atomic_dir, build_in_place])
def test_force_replaces_a_regular_file_again_and_again(tmp_path, builder):
    out = tmp_path / "out"
    out.write_text("a file where the output goes")
    for round_ in range(3):
        with builder(out, force=True) as folder:
            _fill(folder, f"round {round_}")
        assert (out / "model.gguf").read_text() == f"round {round_}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old, no temporaries


@pytest.mark.parametrize("builder", [atomic_dir, build_in_place])
def test_a_failure_keeps_what_was_there(tmp_path, builder):
    out = tmp_path / "out"
    out.mkdir()
    _fill(out, "old")
    with pytest.raises(RuntimeError), builder(out, force=True) as folder:
        _fill(folder)
        raise RuntimeError("verification failed")
    assert (out / "model.gguf").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputExistsError, match="--force"), builder(out):
        pass


def test_temporaries_of_dead_writers_are_removed(tmp_path):
    out = tmp_path / "out"
    # a writer killed with -9: its process id is gone, its temporary folder is not
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{dead.stdout.strip()}.abc123.tmp"
    stale.mkdir()
    (stale / "model.gguf").write_bytes(b"\0" * 1024)
    running = tmp_path / f".out.{os.getppid()}.def456.tmp"  # a live writer's: kept
    running.mkdir()
    unrelated = tmp_path / ".out.notapid.tmp"
    unrelated.mkdir()
    tmp = make_temp_dir(out)
    assert not stale.exists() and running.exists() and unrelated.exists()
    assert tmp.name.startswith(f".out.{os.getpid()}.")


def test_remove_takes_files_links_and_trees(tmp_path):
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "tree")
    for name in ("link", "file", "tree", "absent"):
        remove(tmp_path / name)
    assert list(tmp_path.iterdir()) == []
