"""Files mlc writes and reads: every write is atomic (a temporary file beside the target, fsync'd,
then renamed), so a crash or SIGKILL leaves either the old file or the new one, never half of one.

A temporary is named `.tmp-<pid>-<random>-<name>`. One left behind by a killed writer is removed by
the next write in its directory: when its writer's process is gone (looked at only once the file is
a minute old, as a shared directory may hold another machine's), or when it is an hour old."""
from __future__ import annotations

import io
import math
import os
import re
import secrets
import time
import zipfile

import numpy as np

from mlc.ir.diagnostics import DiagnosticError, Location, error, format_bytes

_TEMPORARY = re.compile(r"\.tmp-(?:(\d+)-[0-9a-f]{8}-)?")
_GRACE, _STALE = 60, 3600  # seconds


def cache_dir() -> str:
    """Where compiled code and tuning tables are kept: $MLC_CACHE_DIR, else ~/.cache/mlc."""
    return os.environ.get("MLC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlc")


def write_atomically(path, data: bytes, mode: int = 0o666, replace: bool = True) -> bool:
    """Write `data` as the file `path`, created with `mode` less the umask (as open() does). With
    replace=False an existing file is kept and False returned: of several processes creating the same
    file at once, one wins and the others read its content."""
    path = str(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
        _remove_stale_temporaries(directory)
        tmp, fd = _create_temporary(directory, os.path.basename(path), mode)
    except OSError as e:
        raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # fails if `path` exists, unlike a rename
            except FileExistsError:
                return False
            finally:
                _unlink(tmp)
        _fsync_directory(directory)  # the rename itself survives a power cut
        return True
    except BaseException as e:
        _unlink(tmp)
        if isinstance(e, OSError):
            raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None
        raise


def _create_temporary(directory: str, name: str, mode: int) -> tuple[str, int]:
    """os.open applies the umask to `mode` (tempfile.mkstemp would force 0600 on every file)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".tmp-{os.getpid()}-{secrets.token_hex(4)}-{name[:64]}")
        try:
            return tmp, os.open(tmp, flags, mode)
        except FileExistsError:
            continue


def _remove_stale_temporaries(directory: str) -> None:
    now = time.time()
    for entry in os.scandir(directory):
        match = _TEMPORARY.match(entry.name)
        if not match:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
            writer_gone = match[1] is not None and age > _GRACE and not _running(int(match[1]))
            if writer_gone or age > _STALE:
                os.unlink(entry.path)
        except OSError:
            pass  # gone already, or another user's in a shared directory


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: it exists
        pass
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_directory(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system can
    finally:
        os.close(fd)


def save_npz(path, arrays: dict) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomically(path, buf.getvalue())


def read_npz(path) -> dict:
    """Every array of an .npz (no pickles); a missing or damaged file is a located error."""
    where = Location(str(path), 0, 0)
    try:
        with zipfile.ZipFile(path) as z:
            return {info.filename.removesuffix(".npy"): _read_member(z, info, where) for info in z.infolist()}
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except IsADirectoryError:
        raise error(where, "is a directory, not an .npz file") from None
    except DiagnosticError:
        raise
    except Exception as e:  # zipfile, zlib and numpy each raise their own kinds for a damaged file
        raise error(where, f"not a readable .npz file ({type(e).__name__}: {e})") from None


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, where) -> np.ndarray:
    with z.open(info) as f:
        return load_npy(f, info.file_size, where, f"not a readable .npz file ('{info.filename}' is damaged)")


def read_array(path) -> np.ndarray:
    """The array of an .npy file (no pickles); a missing or damaged file is a located error."""
    where = Location(str(path), 0, 0)
    try:
        with open(path, "rb") as f:
            if f.read(2) == b"PK":
                raise error(where, "is an .npz archive; give it alone as --input FILE.npz")
            f.seek(0)
            return load_npy(f, os.fstat(f.fileno()).st_size, where)
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except IsADirectoryError:
        raise error(where, "is a directory, not an .npy file") from None
    except OSError as e:
        raise error(where, f"cannot read: {e.strerror}") from None


def load_npy(f, size: int, where, problem: str = "not a readable .npy file") -> np.ndarray:
    """An .npy from file object `f` of `size` bytes. Its header is checked against the bytes there are
    before numpy allocates the array it claims (a header claiming 10^12 elements was a MemoryError)."""
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(f)
        claimed = math.prod(shape) * dtype.itemsize
        if claimed > size - f.tell():
            raise ValueError(f"its header claims {format_bytes(claimed)} of data, it holds {format_bytes(size - f.tell())}")
        f.seek(0)
        return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as e:
        raise error(where, f"{problem} ({e})") from None
