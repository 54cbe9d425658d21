"""Artifacts (.mlcz) and the compile cache.

An artifact is a zip archive:

    manifest.json   format name and version, host key (triple, CPU, features, llvmlite), functions
                    with their run-time checks, globals, and the sha256 of every other member
    module.ir       the module's IR (function signatures and argument names come from it)
    code.ll         the optimised LLVM IR
    code.o          native object code for the host key
    globals/*.npy   the globals' current values (plain .npy, loaded without pickle)

An artifact for a GPU (manifest target "cuda") holds instead of code.ll and code.o the lowered module
(`lowered.ir`: the host code and its gpu.launch kernels) and `kernels.ptx`, made for the manifest's
GPU architecture; the driver compiles the PTX when it loads it.

Loading parses the IR with mlc's parser and reads arrays with numpy (allow_pickle=False); it refuses
a damaged, altered or wrong-version file with a message. Object code built for another host is not
used: the LLVM IR is compiled again. The cache (MLC_CACHE_DIR, default ~/.cache/mlc) keeps the code
part of an artifact per (module text, compiler source, host key); a corrupt entry is ignored and rebuilt.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import zipfile
import zlib

import numpy as np

from mlc.ir.diagnostics import DiagnosticError, Diagnostics, Location, error
from mlc.ir.parser import parse_module
from mlc.ir.verifier import verify

from .files import write_atomically
from mlc.ir.dialects.gpu import Launch, kernel_names

from .executable import Executable, FunctionCode
from .gpu import GpuExecutable, Kernel
from .jit import JitModule, host_key

FORMAT, VERSION = "mlc-artifact", 1


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _members(exe, with_globals: bool) -> dict[str, bytes]:
    if getattr(exe, "target", "cpu") == "cuda":
        files = {"module.ir": str(exe.module).encode(), "lowered.ir": str(exe.lowered).encode(), "kernels.ptx": exe.ptx.encode()}
    else:
        files = {"module.ir": str(exe.module).encode(), "code.ll": exe.jit.optimised_ir.encode(),
                 "code.o": bytes(exe.jit.object_code)}
    if with_globals:
        for name, value in exe.globals.items():
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            files[f"globals/{name}.npy"] = buf.getvalue()
    return files


def _manifest(exe, files) -> dict:
    if getattr(exe, "target", "cpu") == "cuda":
        return {"format": FORMAT, "version": VERSION, "compiler": compiler_fingerprint(), "target": "cuda", "arch": exe.arch,
                "kernels": {k.name: {"checks": [[loc.file, loc.line, loc.col, op, msg] for loc, op, msg in k.checks]}
                            for k in exe.kernels.values()},
                "files": {name: _sha(data) for name, data in files.items()}}
    return {"format": FORMAT, "version": VERSION, "compiler": compiler_fingerprint(), "host": host_key(),
            "functions": {name: {"checks": [[loc.file, loc.line, loc.col, op, msg] for loc, op, msg in f.code.checks]}
                          for name, f in exe.functions.items()},
            "libm": exe.jit.libm_symbols,
            "files": {name: _sha(data) for name, data in files.items()}}


def _write_zip(path, files, manifest):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", json.dumps(manifest, indent=1))
        for name, data in files.items():
            z.writestr(name, data)
    write_atomically(path, buf.getvalue())


def save(exe, path):
    files = _members(exe, with_globals=True)
    _write_zip(path, files, _manifest(exe, files))


def _read(path) -> tuple[dict, dict]:
    where = Location(str(path), 0, 0)
    try:
        with zipfile.ZipFile(path) as z:
            files = {n: z.read(n) for n in z.namelist()}
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError, zipfile.LargeZipFile) as e:
        raise error(where, f"not an mlc artifact (unreadable archive: {e})") from None
    try:
        manifest = json.loads(files.pop("manifest.json"))
    except (KeyError, ValueError, UnicodeDecodeError):
        raise error(where, "not an mlc artifact (no readable manifest.json)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise error(where, "not an mlc artifact (wrong format name)")
    if manifest.get("version") != VERSION:
        raise error(where, f"artifact format version {manifest.get('version')} is not supported (this mlc reads version {VERSION})")
    expected = manifest.get("files")
    if not isinstance(expected, dict) or set(expected) != set(files):
        raise error(where, "damaged artifact: its members do not match the manifest")
    for name, data in files.items():
        if _sha(data) != expected[name]:
            raise error(where, f"damaged artifact: '{name}' does not match its checksum")
    return manifest, files


def _gpu_executable(manifest, files, module_name, where, with_globals=True):
    try:
        module = verify(parse_module(files["module.ir"].decode("utf-8"), f"{module_name}:module.ir", Diagnostics()))
        lowered = verify(parse_module(files["lowered.ir"].decode("utf-8"), f"{module_name}:lowered.ir", Diagnostics()))
        checks = manifest["kernels"]
        kernels = [Kernel(name, launch, Launch.captured(launch), list(launch.attr("block")),
                          [(Location(file, line, col), op, msg) for file, line, col, op, msg in checks[name]["checks"]])
                   for name, launch in kernel_names(lowered)]
        exe = GpuExecutable(module, lowered, files["kernels.ptx"].decode("utf-8"), kernels, manifest["arch"])
    except DiagnosticError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError) as e:
        raise error(where, f"damaged artifact ({type(e).__name__}: {e})") from None
    if with_globals:
        exe.initial_globals = _read_globals(module, files, where)
    return exe


def _read_globals(module, files, where) -> dict:
    out = {}
    for name, op in module.globals.items():
        try:
            value = np.load(io.BytesIO(files[f"globals/{name}.npy"]), allow_pickle=False)
        except (KeyError, ValueError, OSError) as e:
            raise error(where, f"damaged artifact: global '@{name}' is unreadable ({e})") from None
        t = op.attr("type")
        if value.shape != t.shape or value.dtype != t.element.np_dtype:
            raise error(where, f"damaged artifact: global '@{name}' has shape {list(value.shape)} {value.dtype}, expected {t}")
        out[name] = np.array(value, order="C")
    return out


def _executable(manifest, files, module_name, where, globals_=None):
    if manifest.get("target", "cpu") == "cuda":
        return _gpu_executable(manifest, files, module_name, where, with_globals=globals_ is None)
    try:
        module = verify(parse_module(files["module.ir"].decode("utf-8"), f"{module_name}:module.ir", Diagnostics()))
        functions = manifest["functions"]
        codes = {}
        for name, f in functions.items():
            code = FunctionCode(name)
            code.checks = [(Location(file, line, col), op, msg) for file, line, col, op, msg in f["checks"]]
            codes[name] = code
        same_host = manifest.get("host") == host_key()
        jit = JitModule(files["code.ll"].decode("utf-8"), manifest.get("libm", []),
                        object_code=files["code.o"] if same_host else None)
    except DiagnosticError:
        raise
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, RuntimeError) as e:
        raise error(where, f"damaged artifact ({type(e).__name__}: {e})") from None
    if globals_ is None:
        globals_ = _read_globals(module, files, where)
    return Executable(module, jit, codes, globals_)


def load_executable(path):
    """Load an artifact written by `exe.save` or `mlc compile -o`."""
    manifest, files = _read(path)
    return _executable(manifest, files, os.path.basename(str(path)), Location(str(path), 0, 0))


# --- the compile cache --------------------------------------------------------------------------------------

def cache_dir() -> str:
    return os.environ.get("MLC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "mlc")


@functools.cache
def compiler_fingerprint() -> str:
    """A hash of the compiler's own source, so code cached by an older compiler is not reused."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # holds ir/, passes/, codegen/, runtime/
    digest = hashlib.sha256()
    for package in ("ir", "passes", "codegen", "runtime"):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, package))):
            for name in sorted(f for f in files if f.endswith(".py")):
                with open(os.path.join(dirpath, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return digest.hexdigest()


def _cache_path(module, target: str = "cpu", arch: str = "") -> str:
    """Keyed on the module, the compiler's source and what the code is for: the host (CPU), or the GPU
    architecture and the libdevice the PTX links (CUDA)."""
    machine = host_key() if target == "cpu" else {"arch": arch, "libdevice": _libdevice_key(), "llvmlite": host_key()["llvmlite"]}
    key = json.dumps([str(module), compiler_fingerprint(), target, machine], sort_keys=True).encode()
    return os.path.join(cache_dir(), _sha(key) + ".mlcz")


@functools.cache
def _libdevice_key() -> str:
    path = os.environ.get("MLC_LIBDEVICE", "/usr/local/cuda/nvvm/libdevice/libdevice.10.bc")
    try:
        return f"{path}:{os.path.getsize(path)}:{os.path.getmtime(path)}"
    except OSError:
        return "absent"


def cached(module, target: str = "cpu", arch: str = ""):
    """For the CPU: (jit, codes) of a module compiled before on this host; for CUDA: a GpuExecutable
    (without globals) compiled before for this architecture; else None."""
    path = _cache_path(module, target, arch)
    if not os.path.exists(path):
        return None
    try:
        manifest, files = _read(path)
        exe = _executable(manifest, files, "cache", Location(path, 0, 0), globals_={})
        if target == "cuda":
            return exe
        return exe.jit, {name: f.code for name, f in exe.functions.items()}
    except DiagnosticError:  # a corrupt entry: ignore it (it is rebuilt and replaced)
        return None


def store_in_cache(exe):
    try:
        files = _members(exe, with_globals=False)
        target = getattr(exe, "target", "cpu")
        _write_zip(_cache_path(exe.module, target, getattr(exe, "arch", "")), files, _manifest(exe, files))
    except (OSError, DiagnosticError, FileNotFoundError):
        pass  # a read-only or full cache directory (or no libdevice to make PTX) only costs speed
