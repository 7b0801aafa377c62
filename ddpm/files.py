"""Writing a run's files so that a kill at any moment leaves each one whole: written beside its place under a
temporary name, flushed, then renamed into place; and a failed write (a full disk, most often) reported in one
line that names the folder, with no temporary left behind."""

import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

# below this many free bytes after a failed write, the disk is taken to be full: safetensors and torch.save report
# ENOSPC in words of their own ("os error 28", "unexpected pos")
FULL_DISK_BYTES = 1 << 20


class WriteError(RuntimeError):
    """A file of the run could not be written; the message names the folder and the reason."""


def write_temporary(path: Path, write: Callable[[Path], object]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, flush it to disk and return its name; on any failure
    (an exception, such as a full disk) the temporary file is removed."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except Exception:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write `path` whole or not at all: `write(tmp)`, then the rename."""
    os.replace(write_temporary(path, write), path)


def disk_is_full(error: Exception, folder: Path) -> bool:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "No space left on device" in str(error):
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_DISK_BYTES
    except OSError:
        return False


@contextmanager
def reported_as_write_error(what: str, folder: Path):
    """Turn any failure inside the block into a WriteError: "cannot write WHAT in FOLDER: REASON"."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        if disk_is_full(error, folder):
            reason = "no space left on the device"
        else:
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WriteError(f"cannot write {what} in {folder}: {reason}") from error
