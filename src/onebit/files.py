"""Crash-safe file writing: nothing half-written is ever left where a good file was."""
from __future__ import annotations

import contextlib
import os
import tempfile
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from .errors import FileWriteError

__all__ = ["atomic_write", "check_output_files", "save_png", "zip_integrity_error"]


class _RecordingFile:
    """Forwards everything to the real file; remembers the first OSError its writes raised.

    Some writers swallow the OSError of a failed ``write`` and raise something unrelated
    (``torch.save`` raises ``RuntimeError: unexpected pos ...``); this lets
    :func:`atomic_write` report the real cause (e.g. "No space left on device").
    """

    def __init__(self, handle: IO) -> None:
        self._handle = handle
        self.write_error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            if self.write_error is None:
                self.write_error = exc
            raise

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __iter__(self):
        return iter(self._handle)


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, racy with other threads)
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(path: Path) -> int:
    """The permissions ``path`` keeps (if it exists) or an ``open()``-created file would get."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def _write_error(path: Path, exc: OSError) -> FileWriteError:
    reason = exc.strerror or str(exc) or type(exc).__name__
    error = FileWriteError(f"cannot write {path}: {' '.join(str(reason).split())}; its previous content (if any) is unchanged")
    error.errno = exc.errno
    return error


def check_output_files(*paths: str | os.PathLike | None) -> None:
    """Before work that ends in writing ``paths`` (None: not asked for): refuse a path that is a
    folder, so that a command does not write its other outputs and then fail on that one."""
    for path in paths:
        if path is not None and Path(path).is_dir():
            raise FileWriteError(f"cannot write {path}: it is a folder; give a file name")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success fsync it and rename it over ``path``.

    If the body raises (or the process dies), ``path`` keeps its previous content and the
    temporary file is removed (or, after a kill, left under a ``.<name>.*.tmp`` name, never
    ``path``). A failure of the file system itself (disk full, permissions, ...) — in the
    body's writes, the flush, the fsync or the rename — is raised as :class:`FileWriteError`,
    one line naming ``path`` and the cause, even where the body turned it into another error.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _write_error(path, exc) from exc
    with contextlib.suppress(OSError):  # mkstemp makes 0600 files; give the usual mode (or keep path's)
        os.fchmod(fd, _mode_for(path))
    try:
        handle = os.fdopen(fd, mode)
        recorder = _RecordingFile(handle)
        try:
            yield recorder  # type: ignore[misc]
        except Exception as exc:
            # the body failed: blame the file system only if one of the file's writes failed
            with contextlib.suppress(OSError):
                handle.close()
            if recorder.write_error is not None and not isinstance(exc, FileWriteError):
                raise _write_error(path, recorder.write_error) from exc
            raise
        except BaseException:
            with contextlib.suppress(OSError):
                handle.close()
            raise
        try:
            with handle:
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise _write_error(path, exc) from exc
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def zip_integrity_error(path: str | os.PathLike) -> str | None:
    """None if every record of the zip archive at ``path`` matches its CRC-32, else what is wrong (one line).

    ``torch.load`` does not check the CRCs of a checkpoint's records (its zip reader is built
    without them), so a flipped bit in a tensor silently changes a weight; checking them first
    turns any damage of the data into an error.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    # zipfile raises NotImplementedError for a record with an unknown compression method: a bad file, not a stub
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, NotImplementedError,
            UnicodeDecodeError, RuntimeError, zlib.error) as exc:
        return f"not a valid zip archive ({' '.join(str(exc).split())[:120] or type(exc).__name__})"
    if bad is not None:
        return f"checksum mismatch in record {bad[:80]!r} (corrupt file)"
    return None


def save_png(figure: Any, path: str | os.PathLike) -> Path:
    """Write a matplotlib ``figure`` to ``path`` as PNG through :func:`atomic_write`; return the path.

    The layout is fitted to the drawn content (``bbox_inches="tight"``), so legends placed
    beside the axes are kept.
    """
    path = Path(path)
    with atomic_write(path) as handle:
        figure.savefig(handle, format="png", dpi=100, bbox_inches="tight")
    return path
