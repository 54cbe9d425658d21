"""Files mlc writes and reads: every write is atomic (a temporary file beside the target, fsync'd,
then renamed), so a crash or SIGKILL leaves either the old file or the new one, never half of one."""
from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from mlc.ir.diagnostics import Location, error


def write_atomically(path, data: bytes) -> None:
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):
            raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None
        raise


def save_npz(path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomically(path, buf.getvalue())


def read_npz(path) -> dict:
    """Every array of an .npz (no pickles); a missing or damaged file is a located error."""
    where = Location(str(path), 0, 0)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except IsADirectoryError:
        raise error(where, "is a directory, not an .npz file") from None
    except Exception as e:  # zipfile, zlib and numpy each raise their own kinds for a damaged file
        raise error(where, f"not a readable .npz file ({type(e).__name__}: {e})") from None
