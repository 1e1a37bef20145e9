"""Writing outputs so that nothing is ever half-written, and hashing what we wrote.

Every artifact (checkpoint, bundle, export, report) is built in a temporary sibling and
renamed into place: a crash leaves either the old artifact or the new one, never a mix.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from coalora_edge.errors import OutputExistsError, OutputLocationError

HASH_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is for secrets; outputs get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def existing_parent(path: Path) -> Path:
    """The nearest folder above ``path`` that exists: where its parents would be created."""
    parent = next(p for p in Path(path).absolute().parents if p.exists())
    if not parent.is_dir():
        raise OutputLocationError(f"cannot write {path}: {parent} is a file, not a folder; pick another output")
    return parent


def remove(path: Path) -> None:
    """Delete whatever is at ``path`` (file, link or folder tree); a one-line error if it cannot."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise OutputLocationError(f"cannot remove {e.filename or path}: {e.strerror}; remove it by hand "
                                  "or pick another output") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Delete the temporary folders beside ``path`` whose writer died (a ``kill -9`` leaves
    a whole model behind): their names carry the writer's process id, still running ones stay."""
    if not path.parent.is_dir():
        return
    for entry in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = entry.name[len(path.name) + 2:].split(".", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OutputLocationError):
                remove(entry)


def make_temp_dir(path: Path) -> Path:
    """An empty hidden folder beside ``path`` (its parents created), to be renamed to it."""
    existing_parent(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp"))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would survive the rename into place
        return tmp
    except OSError as e:  # no permission, a read-only or full disk
        raise OutputLocationError(f"cannot write {path}: {e.strerror} ({e.filename}); "
                                  "pick an output inside a folder you can write to") from None


def _cleanup(path: Path) -> None:
    """Remove a partial output while another error is on its way: that error is the one to report."""
    with contextlib.suppress(OutputLocationError):
        remove(path)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes ``path`` only if the block succeeds.

    An existing ``path`` (folder or file) is refused unless ``force``; with ``force`` it is
    replaced only after the new folder is complete.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --force to replace it")
    tmp = make_temp_dir(path)
    try:
        yield tmp
        if path.exists() or path.is_symlink():
            old = path.with_name(f".{path.name}.old")
            remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _cleanup(tmp)
        raise


@contextlib.contextmanager
def build_in_place(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield ``path`` to fill with artifacts that each record where they live (a bundle's
    path is in its exports' reports), so it cannot be built under a temporary name.

    If the block fails, the partial folder is removed and a replaced one comes back; an
    existing ``path`` is refused unless ``force``, and deleted only once the block succeeds.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; choose another output or pass --force to replace it")
    old = path.with_name(f".{path.name}.old")
    remove(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    try:
        path.mkdir(parents=True)
        yield path
    except BaseException:
        _cleanup(path)
        if old.exists() or old.is_symlink():
            os.replace(old, path)
        raise
    remove(old)
