"""Atomic writes: a file (or a whole folder) is either its old version or its new one.

Every file the toolkit writes goes through a hidden temporary in the same folder, is synced
to disk and renamed over its target, so a kill -9 or a power cut never leaves half a file.
A failed write (full disk, lost permission) removes the temporary and raises WriteError,
naming the file; the previous version stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from toolkit import seams
from toolkit.errors import ToolkitError

# Every temporary name ends with this and starts with a dot: `.last.pt.k3j2x9.tmp`. Nothing
# globs for it by accident (no `*.pt` matches), and remove_stale_temp finds what a killed
# write left behind.
TEMP_SUFFIX = ".tmp"


class WriteError(ToolkitError, OSError):
    """An atomic write failed (full disk, lost permission...); the previous file is intact.

    Also an OSError, so a caller that treats a failed write as harmless (a cache) still can.
    """

    def __init__(self, path: Path, cause: OSError):
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(
            f"could not write '{path}': {reason}; its previous version, if any, is unchanged"
        )
        # Like any OSError: callers that add their own context ("cannot write the export
        # to ...: {exc.strerror}") show the cause, not this whole sentence a second time.
        self.errno, self.strerror = cause.errno, reason
        self.path = Path(path)

    def __str__(self) -> str:  # OSError's own would print "[Errno 28] ..." instead
        return self.args[0]


def _readable_mode(base: int = 0o666) -> int:
    """`base` minus the umask: what open() / mkdir() would give, not mkstemp's owner-only."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _fill_temp(fd: int, tmp: str, write: Callable[[BinaryIO], None]) -> None:
    """Write the temporary file through `write`, then make it readable and durable.

    The step a full disk fails (in write, flush or fsync); the FILL_TEMP seam simulates that.
    """
    seams.FILL_TEMP(fd=fd, tmp=tmp, write=write)
    with os.fdopen(fd, "wb") as f:
        write(f)
        f.flush()
        os.fchmod(f.fileno(), _readable_mode())
        os.fsync(f.fileno())


def _commit(tmp: str | Path, path: Path) -> None:
    """Rename the finished temporary over `path`: the one atomic step of every write.

    Tests pause here (the BEFORE_RENAME seam) to SIGKILL a writer between a complete
    temporary and its rename.
    """
    seams.BEFORE_RENAME(tmp=Path(tmp), path=Path(path))
    os.replace(tmp, path)
    _fsync_folder(Path(path).parent)


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself survive a power cut; some filesystems refuse fsync on a folder,
    # which only weakens that guarantee, never the kill -9 one.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _os_error_in(exc: BaseException) -> OSError | None:
    """The OSError behind `exc`, if any (torch.save wraps a failed write in a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`.

    A crash (even SIGKILL) leaves either the old file or the new one, never half of one; a
    failed write (ENOSPC...) removes the temporary and raises WriteError naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        _fill_temp(fd, tmp, write)
        _commit(tmp, path)
    except Exception as exc:
        Path(tmp).unlink(missing_ok=True)
        cause = _os_error_in(exc)
        if cause is None or isinstance(exc, WriteError):
            raise
        raise WriteError(path, cause) from exc
    except BaseException:  # Ctrl-C mid-write: no temporary left behind, the old file stays
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(path: Path, obj: Any) -> None:
    # Through a Python file object, not a path: torch's own file writer reports a full disk
    # as a bare RuntimeError, a Python write keeps the OSError (and its errno) behind it.
    import torch  # here, not at the top: the torch-free commands write text files too

    _atomic_write(path, lambda f: torch.save(obj, f))


@contextlib.contextmanager
def atomic_folder(path: Path) -> Iterator[Path]:
    """Fill a fresh hidden folder beside `path`; when the block succeeds it replaces `path`.

    A crash at any point leaves `path` as it was or, between the two renames of the swap,
    absent: never a mix of an old and a new set of files. What a killed writer left behind
    is hidden (`.NAME.*.tmp`) and removed by remove_stale_temp.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(_temp_folder(path))
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        yield staging
        _swap_in(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _temp_folder(path: Path) -> str:
    folder = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.chmod(folder, _readable_mode(0o777))  # mkdtemp's 0o700 would hide it from others
    return folder


def _swap_in(staging: Path, path: Path) -> None:
    """Replace folder `path` by `staging`: rename the old one aside, the new one in."""
    try:
        if not path.exists():
            _commit(staging, path)
            return
        # rename() may replace an empty folder: reserve a hidden name, move the old one there.
        old = _temp_folder(path)
        _commit(path, old)
        try:
            _commit(staging, path)
        except OSError:
            os.replace(old, path)  # put the old set back rather than leave none
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        raise WriteError(path, exc) from exc


def remove_stale_temp(folder: Path, name: str = "*") -> list[Path]:
    """Remove what killed atomic writes left in `folder`: `.NAME.*.tmp` files and folders.

    Only for a folder no other process is writing to at the moment (its owner resuming).
    """
    removed = []
    for stale in sorted(Path(folder).glob(f".{name}.*{TEMP_SUFFIX}")):
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
