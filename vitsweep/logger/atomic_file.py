"""Files written whole or not at all: checkpoints, summary.json.

The bytes go to `<name>.tmp` in the same folder, are flushed to the disk (fsync), and only then renamed
over `<name>`, and the folder's entry is synced too: after a crash or power loss the file is either the
old one or the new one, never a prefix. A write that fails (a full disk, a quota, a vanished mount)
removes its temp file, leaves the old file untouched, and raises OutputWriteError: one line naming the
path and the reason (vitsweep.run.job prints it as `error: ...`, no traceback).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


class OutputWriteError(OSError):
    """A job output that could not be written; the message names the path."""


class RecordingFile:
    """A file whose writes remember the OSError they raised: torch.save turns a failed write (ENOSPC) into
    `RuntimeError: unexpected pos`, and the reason would be lost."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def sync_dir(folder: Path) -> None:
    """fsync the folder, so the rename itself survives a crash (where the platform allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # e.g. Windows: folders cannot be opened; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not sync folders; nothing more can be done
    finally:
        os.close(fd)


def write_atomic(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write `path` through `write(file)`, atomically and durably (module docstring)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    recording = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            recording = RecordingFile(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        tmp.unlink(missing_ok=True)
        if not isinstance(err, OSError):
            if recording is None or recording.error is None:
                raise  # not a write failure: a bug to see in full
            err = recording.error
        reason = err.strerror or str(err)
        raise OutputWriteError(f"cannot write {path}: {reason} (errno {err.errno}): free space or fix the folder's "
                               f"permissions; the previous {path.name}, if any, is unchanged") from None
    except BaseException:
        tmp.unlink(missing_ok=True)  # interrupted or failed mid-write: no half file left behind
        raise
    sync_dir(path.parent)
