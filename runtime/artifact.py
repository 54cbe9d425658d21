"""Artifacts (.mlcz) and the compile cache.

An artifact is a zip archive:

    manifest.json   format name and version, host key (triple, CPU, features, llvmlite), functions
                    with their run-time checks, and the sha256 and size of every member below
    manifest.sig    an HMAC-SHA256 of manifest.json made with the writer's key (runtime/trust.py)
    module.ir       the module's IR (function signatures and argument names come from it)
    code.ll         the LLVM IR
    code.o          native object code for the host key: an ELF object, or an `ar` archive of several
                    (a large module is compiled in parts, runtime/jit.py)
    globals/*.npy   the globals' current values (plain .npy, loaded without pickle)

An artifact for a GPU (manifest target "cuda") holds instead of code.ll and code.o the lowered module
(`lowered.ir`: the host code and its gpu.launch kernels) and `kernels.ptx`, made for the manifest's
GPU architecture; the driver compiles the PTX when it loads it.

Loading checks everything before using anything: the members' sizes against the manifest before any
is decompressed (a zip bomb is refused unopened), the manifest against its schema, every checksum,
the IR (parsed and verified as any input), the globals against the IR's types. The artifact's own
code (object code, LLVM IR, PTX) is used only if a key the user trusts signed the manifest; object
code only if made for this host and, as llvmlite crashes on a malformed object, only once it is seen
to be well-formed ELF objects defining every function. Signed code for another host is compiled
again from its LLVM IR. An unsigned artifact is rebuilt from module.ir by the caller's `rebuild` (the
compiler, which runtime cannot import). Any problem is a located DiagnosticError, never a traceback.

The cache (MLC_CACHE_DIR, default ~/.cache/mlc) keeps the code part of an artifact per (module text,
compiler source, host key), signed with the user's key; an entry that is unreadable, damaged or not
signed by a trusted key, for whatever reason, is a miss: it is rebuilt and replaced.
"""
from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import struct
import warnings
import zipfile
from typing import NamedTuple

import numpy as np

from mlc.ir.diagnostics import DiagnosticError, Diagnostics, Location, error
from mlc.ir.dialects.gpu import Launch, kernel_names
from mlc.ir.dialects.mlc import BINARY, UNARY
from mlc.ir.memory import check_fits_in_memory
from mlc.ir.parser import parse_module
from mlc.ir.verifier import verify

from . import trust, tuning
from .executable import Executable, FunctionCode
from .files import cache_dir, load_npy, write_atomically
from .gpu import GpuExecutable, Kernel
from .jit import JitModule, host_key, unarchive

FORMAT, VERSION = "mlc-artifact", 2
MAX_BYTES = 8 << 30           # all members, decompressed: an artifact must fit in memory
MAX_MANIFEST = 64 << 20       # manifest.json (its lists of run-time checks grow with the model)
MAX_MEMBERS = 1 << 16
CODE = {"cpu": {"module.ir", "code.ll", "code.o"}, "cuda": {"module.ir", "lowered.ir", "kernels.ptx"}}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- writing ------------------------------------------------------------------------------------------------

def _members(exe, with_globals: bool) -> dict[str, bytes]:
    if getattr(exe, "target", "cpu") == "cuda":
        files = {"module.ir": str(exe.module).encode(), "lowered.ir": str(exe.lowered).encode(), "kernels.ptx": exe.ptx.encode()}
    else:
        files = {"module.ir": str(exe.module).encode(), "code.ll": exe.jit.llvm_ir.encode(),
                 "code.o": bytes(exe.jit.object_code)}
    if with_globals:
        for name, value in exe.globals.items():
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            files[f"globals/{name}.npy"] = buf.getvalue()
    return files


def _checks(checks) -> dict:
    return {"checks": [[loc.file, loc.line, loc.col, op, msg] for loc, op, msg in checks]}


def _manifest(exe, files) -> dict:
    listed = {name: {"sha256": _sha(data), "size": len(data)} for name, data in files.items()}
    if getattr(exe, "target", "cpu") == "cuda":
        return {"format": FORMAT, "version": VERSION, "compiler": compiler_fingerprint(), "target": "cuda", "arch": exe.arch,
                "kernels": {k.name: _checks(k.checks) for k in exe.kernels.values()}, "files": listed}
    return {"format": FORMAT, "version": VERSION, "compiler": compiler_fingerprint(), "host": host_key(),
            "functions": {name: _checks(f.code.checks) for name, f in exe.functions.items()},
            "libm": exe.jit.libm_symbols, "files": listed}


def _write_zip(path, files, manifest, key: bytes | None):
    raw = json.dumps(manifest, indent=1).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("manifest.json", raw)
        if key is not None:
            z.writestr("manifest.sig", trust.sign(raw, key))
        for name, data in files.items():
            z.writestr(name, data)
    write_atomically(path, buf.getvalue())


def save(exe, path):
    try:
        key = trust.own_key(create=True)
    except DiagnosticError as e:  # still a good artifact (loaders rebuild it from its IR): don't lose it
        warnings.warn(f"the artifact {path} is saved unsigned: {e}", stacklevel=3)
        key = None
    files = _members(exe, with_globals=True)
    _write_zip(path, files, _manifest(exe, files), key)


# --- the manifest's schema, checked before any of it is used -------------------------------------------------

class Str(NamedTuple):
    pattern: str | None = None
    max: int = 4096


class Int(NamedTuple):
    lo: int = 0
    hi: int = 2**31 - 1


class ListOf(NamedTuple):
    item: object
    max: int = 1 << 20


class MapOf(NamedTuple):  # a dict with keys of one kind; a plain dict in a schema is a record: exactly its keys
    key: Str
    value: object
    max: int = MAX_MEMBERS


HEX64 = r"[0-9a-f]{64}"
CHECKS = {"checks": ListOf((Str(), Int(), Int(), Str(max=256), Str()))}  # file, line, column, op, message
COMMON = {"format": Str(), "version": Int(), "compiler": Str(HEX64),
          "files": MapOf(Str(r"module\.ir|code\.ll|code\.o|lowered\.ir|kernels\.ptx|globals/.+\.npy", 1024),
                         {"sha256": Str(HEX64), "size": Int(0, MAX_BYTES)})}
SCHEMA = {
    "cpu": {**COMMON, "host": {"triple": Str(max=256), "cpu": Str(max=256), "features": Str(max=1 << 16), "llvmlite": Str(max=64)},
            "functions": MapOf(Str(), CHECKS), "libm": ListOf(Str(max=64), 1024)},
    "cuda": {**COMMON, "target": Str("cuda"), "arch": Str(r"sm_\d+a?", 16), "kernels": MapOf(Str(), CHECKS)},
}


def _problem(value, spec, at: str) -> str | None:
    """What is wrong with `value` as `spec` (at `at` in the manifest), or None."""
    if isinstance(spec, Str):
        ok = isinstance(value, str) and len(value) <= spec.max and (spec.pattern is None or re.fullmatch(spec.pattern, value, re.S))
        return None if ok else f"{at} must be a string of at most {spec.max} characters" + (f" matching {spec.pattern}" if spec.pattern else "")
    if isinstance(spec, Int):
        ok = type(value) is int and spec.lo <= value <= spec.hi
        return None if ok else f"{at} must be an integer from {spec.lo} to {spec.hi}"
    if isinstance(spec, ListOf):
        if not isinstance(value, list) or len(value) > spec.max:
            return f"{at} must be a list of at most {spec.max} entries"
        return next(filter(None, (_problem(v, spec.item, f"{at}[{i}]") for i, v in enumerate(value))), None)
    if isinstance(spec, MapOf):
        if not isinstance(value, dict) or len(value) > spec.max:
            return f"{at} must be an object of at most {spec.max} entries"
        return next(filter(None, (_problem(k, spec.key, f"a key of {at}") or _problem(v, spec.value, f"{at}[{json.dumps(k)[:80]}]")
                                  for k, v in value.items())), None)
    if isinstance(spec, tuple):
        if not isinstance(value, list) or len(value) != len(spec):
            return f"{at} must be a list of {len(spec)} entries"
        return next(filter(None, (_problem(v, s, f"{at}[{i}]") for i, (v, s) in enumerate(zip(value, spec)))), None)
    if not isinstance(value, dict) or set(value) != set(spec):
        return f"{at} must be an object with exactly the keys {', '.join(sorted(spec))}"
    return next(filter(None, (_problem(value[k], s, f"{at}.{k}") for k, s in spec.items())), None)


def libm_names() -> frozenset:
    """The C math functions compiled code may call: codegen's libm calls are the elementwise rows' scalar
    functions, f32 ('tanhf') or f64 ('tanh'). The JIT resolves nothing else from libm."""
    names = {row.scalar for row in (*UNARY.values(), *BINARY.values()) if isinstance(row.scalar, str)}
    return frozenset(names | {n + "f" for n in names})


def _parse_manifest(raw: bytes, where) -> dict:
    try:
        manifest = json.loads(raw)
    except (ValueError, RecursionError):
        raise error(where, "not an mlc artifact (no readable manifest.json)") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise error(where, "not an mlc artifact (wrong format name)")
    if manifest.get("version") != VERSION:
        raise error(where, f"artifact format version {str(manifest.get('version'))[:20]} is not supported (this mlc reads version {VERSION})")
    target = manifest.get("target", "cpu")
    known = isinstance(target, str) and target in SCHEMA
    problem = _problem(manifest, SCHEMA[target], "the manifest") if known else "the manifest names an unknown target"
    unknown = sorted(set(manifest.get("libm", [])) - libm_names()) if not problem else []
    if unknown:
        problem = f"the manifest's libm lists {', '.join(unknown[:5])}, which are not C math functions mlc calls"
    if problem:
        raise error(where, f"invalid artifact: {problem}")
    return manifest


# --- reading ------------------------------------------------------------------------------------------------

class Contents(NamedTuple):
    manifest: dict
    files: dict[str, bytes]  # every member but manifest.json and manifest.sig
    signer: str | None       # the id of the trusted key that signed it


def _read(path) -> Contents:
    where = Location(str(path), 0, 0)
    try:
        z = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except Exception as e:  # zipfile, zlib and the OS each raise their own kinds for a damaged file
        raise error(where, f"not an mlc artifact (unreadable archive: {e})") from None
    with z:
        infos = _listing(z, where)
        if "manifest.json" not in infos:
            raise error(where, "not an mlc artifact (no readable manifest.json)")
        raw = _unzip(z, infos.pop("manifest.json"), MAX_MANIFEST, where)
        manifest = _parse_manifest(raw, where)
        signature = _unzip(z, infos.pop("manifest.sig"), 4096, where) if "manifest.sig" in infos else None
        _check_listing(infos, manifest, where)
        files = {name: _unzip(z, info, info.file_size, where) for name, info in infos.items()}
    for name, data in files.items():
        if _sha(data) != manifest["files"][name]["sha256"]:
            raise error(where, f"damaged artifact: '{name}' does not match its checksum")
    return Contents(manifest, files, trust.signer(raw, signature))


def _listing(z, where) -> dict[str, zipfile.ZipInfo]:
    infos = z.infolist()
    if len(infos) > MAX_MEMBERS + 2:
        raise error(where, f"not an mlc artifact ({len(infos)} members)")
    by_name = {info.filename: info for info in infos}
    if len(by_name) != len(infos):
        raise error(where, "damaged artifact: a member name appears twice")
    return by_name


def _check_listing(infos, manifest, where) -> None:
    """The members are those the manifest lists, of the sizes it says: read from the archive's directory,
    before anything is decompressed."""
    listed = manifest["files"]
    if set(infos) != set(listed) or not CODE[manifest.get("target", "cpu")] <= set(listed):
        raise error(where, "damaged artifact: its members do not match the manifest")
    for name, info in infos.items():
        if info.file_size != listed[name]["size"]:
            raise error(where, f"damaged artifact: '{name}' is {info.file_size} bytes, its manifest says {listed[name]['size']}")
    total = sum(info.file_size for info in infos.values())
    if total > MAX_BYTES:
        raise error(where, f"artifact too large: {total:,} bytes decompressed, more than the {MAX_BYTES:,} mlc reads")


def _unzip(z, info, limit: int, where) -> bytes:
    if info.file_size > limit:
        raise error(where, f"damaged artifact: '{info.filename}' is {info.file_size:,} bytes, more than {limit:,}")
    try:
        with z.open(info) as f:
            data = f.read(info.file_size)  # (zipfile stops there too; compressed bytes past it are not read)
    except Exception as e:  # zlib, bz2, lzma, zipfile (a bad CRC), encrypted members, the OS
        raise error(where, f"damaged artifact: '{info.filename}' is unreadable ({type(e).__name__}: {e})") from None
    if len(data) != info.file_size:
        raise error(where, f"damaged artifact: '{info.filename}' is cut short")
    return data


def _parse(files, member: str, label: str, where):
    try:
        text = files[member].decode("utf-8")
    except UnicodeDecodeError:
        raise error(where, f"damaged artifact: '{member}' is not UTF-8 text") from None
    return verify(parse_module(text, f"{label}:{member}", Diagnostics()))


def _check_module(contents: Contents, module, where, with_globals: bool) -> None:
    """What the manifest names exists in the IR: its functions, and a .npy for each global (artifacts)."""
    extra = [n for n in contents.manifest.get("functions", {}) if n not in module.functions or module.functions[n].is_private]
    if extra:
        raise error(where, f"invalid artifact: the manifest lists @{extra[0]}, which is not a public function of its IR")
    expected = CODE[contents.manifest.get("target", "cpu")] | ({f"globals/{g}.npy" for g in module.globals} if with_globals else set())
    if set(contents.files) != expected:
        odd = sorted(set(contents.files) ^ expected)
        raise error(where, f"damaged artifact: its members do not match its IR ({', '.join(odd[:3])})")


def _read_globals(module, files, where) -> dict:
    out = {}
    for name, op in module.globals.items():
        check_fits_in_memory(f"@{name}", op.attr("type").nbytes, where, "mlc.global")
        data = files[f"globals/{name}.npy"]
        value = load_npy(io.BytesIO(data), len(data), where, f"damaged artifact: global '@{name}' is unreadable")
        t = op.attr("type")
        if value.shape != t.shape or value.dtype != t.element.np_dtype:
            raise error(where, f"damaged artifact: global '@{name}' has shape {list(value.shape)} {value.dtype}, expected {t}")
        out[name] = np.array(value, order="C")
    return out


# --- the artifact's own code: used only when signed by a trusted key ----------------------------------------

def _native(contents: Contents, where) -> tuple[JitModule, dict]:
    """(jit, codes) from the object code if it is for this host, else from the LLVM IR."""
    manifest, files = contents.manifest, contents.files
    codes = {name: FunctionCode(name, [(Location(file, line, col), op, msg) for file, line, col, op, msg in f["checks"]])
             for name, f in manifest["functions"].items()}
    obj = files["code.o"] if manifest["host"] == host_key() and _host_object_header() else None
    if obj is not None and (problem := _object_problem(obj, list(codes))):
        raise error(where, f"damaged artifact: code.o {problem}")
    try:
        jit = JitModule(files["code.ll"].decode("utf-8"), manifest["libm"], object_code=obj)
    except (RuntimeError, ValueError) as e:  # LLVM refuses the IR
        raise error(where, f"damaged artifact: code.ll does not compile ({e})") from None
    missing = [name for name in codes if not jit.address(name)]
    if missing:
        raise error(where, f"damaged artifact: its code does not define @{missing[0]}")
    return jit, codes


def _gpu_code(contents: Contents, module, label: str, where) -> GpuExecutable:
    lowered = _parse(contents.files, "lowered.ir", label, where)
    checks = contents.manifest["kernels"]
    launches = kernel_names(lowered)
    public = [name for name, f in module.functions.items() if not f.is_private]
    if set(checks) != {name for name, _ in launches} or any(name not in lowered.functions for name in public):
        raise error(where, "damaged artifact: its kernels do not match lowered.ir")
    try:
        kernels = [Kernel(name, launch, Launch.captured(launch), list(launch.attr("block")),
                          [(Location(file, line, col), op, msg) for file, line, col, op, msg in checks[name]["checks"]])
                   for name, launch in launches]
        ptx = contents.files["kernels.ptx"].decode("utf-8")
    except (KeyError, TypeError, ValueError) as e:
        raise error(where, f"damaged artifact ({type(e).__name__}: {e})") from None
    return GpuExecutable(module, lowered, ptx, kernels, contents.manifest["arch"])


@functools.cache
def _host_object_header() -> bytes | None:
    """The first 20 bytes (ELF class, byte order, type, machine) of the object files LLVM makes here; None
    where they are not ELF64: there object code is not loaded, as it cannot be checked, but compiled again."""
    obj = JitModule("").object_code  # (an empty module)
    return obj[:20] if obj[:5] == b"\x7fELF\x02" else None


def _object_problem(code: bytes, functions) -> str | None:
    """Why `code` is not well-formed ELF64 objects for this host (one, or an `ar` archive of them:
    runtime/jit.py) defining `functions`, or None. llvmlite does not check: it crashes the process on
    empty, cut or junk object code."""
    objects = unarchive(code)
    if objects is None:
        return "is a damaged archive"
    defined: set[str] = set()
    for obj in objects:
        if problem := _elf_problem(obj, defined):
            return problem
    missing = [name for name in functions if name not in defined]
    return f"does not define @{missing[0]}" if missing else None


def _elf_problem(obj: bytes, defined: set) -> str | None:
    """Why `obj` is not a well-formed ELF64 object for this host, or None; adds the functions it defines to `defined`."""
    if len(obj) < 64 or obj[:20] != _host_object_header():
        return "is not object code for this machine"
    e = "<" if obj[5] == 1 else ">"
    (shoff,), (entsize, count) = struct.unpack_from(e + "Q", obj, 0x28), struct.unpack_from(e + "HH", obj, 0x3A)
    if entsize != 64 or count == 0 or shoff + 64 * count > len(obj):
        return "has a damaged section table"
    # each: name, type, flags, address, offset, size, link, info, alignment, entry size
    sections = [struct.unpack_from(e + "IIQQQQIIQQ", obj, shoff + 64 * i) for i in range(count)]
    return next(filter(None, (_section_problem(obj, e, section, sections, defined) for section in sections)), None)


def _section_problem(obj: bytes, e: str, section, sections, defined: set) -> str | None:
    """Checks a section lies in the file, and the entries of a symbol or relocation table; adds the
    functions a symbol table defines to `defined`."""
    _, kind, _, _, offset, size, link, info, _, entry = section
    if (kind != 8 and offset + size > len(obj)) or link >= len(sections):  # 8: SHT_NOBITS, no bytes in the file
        return "has a section outside the file"
    if kind == 2:  # the symbol table, its names in section `link`
        names = sections[link]
        if entry != 24 or size % 24 or names[1] != 3:
            return "has a damaged symbol table"
        strings = obj[names[4]: names[4] + names[5]]
        for name, sym_info, _, index, value, sym_size in struct.iter_unpack(e + "IBBHQQ", obj[offset: offset + size]):
            end = strings.find(b"\0", name)
            if end < 0:
                return "has a damaged symbol table"
            if sym_info & 0xF == 2 and 0 < index < len(sections) and value + sym_size <= sections[index][5]:  # a function, in its section
                defined.add(strings[name:end].decode("utf-8", "replace"))
    if kind in (4, 9):  # relocations (RELA, REL) of section `info`, against the symbols of `link`
        step = 24 if kind == 4 else 16
        if entry != step or size % step or sections[link][1] != 2 or info >= len(sections):
            return "has a damaged relocation table"
        symbols, target = sections[link][5] // 24, sections[info][5]
        for at, what in struct.iter_unpack(e + "QQ", b"".join(obj[p: p + 16] for p in range(offset, offset + size, step))):
            if what >> 32 >= symbols or at + 8 > target:
                return "has a relocation outside its section"
    return None


# --- loading ------------------------------------------------------------------------------------------------

def load_executable(path, rebuild=None):
    """Load an artifact written by `exe.save` or `mlc compile -o`. Its code is used only when a key the
    user trusts signed it (runtime/trust.py); otherwise `rebuild(module, target, arch)`, the compiler,
    makes the executable again from the artifact's IR, and the artifact's globals are put in it."""
    where, label = Location(str(path), 0, 0), os.path.basename(str(path))
    contents = _read(path)
    module = _parse(contents.files, "module.ir", label, where)
    _check_module(contents, module, where, with_globals=True)
    globals_ = _read_globals(module, contents.files, where)
    target = contents.manifest.get("target", "cpu")
    if contents.signer is None:
        return _rebuilt(rebuild, module, target, contents.manifest.get("arch"), globals_, where)
    if target == "cuda":
        exe = _gpu_code(contents, module, label, where)
        exe.initial_globals = globals_
        return exe
    return Executable(module, *_native(contents, where), globals_)


def _rebuilt(rebuild, module, target, arch, globals_, where):
    if rebuild is None:
        raise error(where, "the artifact is not signed by a key you trust (see MLC_TRUSTED_KEYS), so its code is not "
                           "run, and no compiler was given to rebuild it from its IR")
    exe = rebuild(module, target, arch)
    if target == "cuda":
        exe.initial_globals = globals_
    else:
        for name, value in globals_.items():
            exe.set_global(name, value)
    return exe


# --- the compile cache --------------------------------------------------------------------------------------

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


def _cache_path(module, target: str = "cpu", arch: str = "", profile: bool = False) -> str:
    """Keyed on the module and the file it came from (its run-time checks name it), the compiler's source
    and what the code is for: the host and its tuning table (CPU), or the GPU architecture and the
    libdevice the PTX links (CUDA); profiled code (runtime/profile.py) apart."""
    machine = {**host_key(), "tuning": tuning.digest()} if target == "cpu" else \
        {"arch": arch, "libdevice": _libdevice_key(), "llvmlite": host_key()["llvmlite"]}
    key = json.dumps([str(module), module.loc.file, compiler_fingerprint(), target, machine] + (["profile"] if profile else []),
                     sort_keys=True).encode()
    return os.path.join(cache_dir(), _sha(key) + ".mlcz")


@functools.cache
def _libdevice_key() -> str:
    path = os.environ.get("MLC_LIBDEVICE", "/usr/local/cuda/nvvm/libdevice/libdevice.10.bc")
    try:
        return f"{path}:{os.path.getsize(path)}:{os.path.getmtime(path)}"
    except OSError:
        return "absent"


def cached(module, target: str = "cpu", arch: str = "", profile: bool = False):
    """For the CPU: (jit, codes) of a module compiled before on this host (profiled or not); for CUDA: a
    GpuExecutable (without globals) compiled before for this architecture; else None."""
    path = _cache_path(module, target, arch, profile)
    if not os.path.exists(path):
        return None
    try:
        return _cache_hit(path, module, target)
    except Exception:  # unreadable, damaged, unsigned or anything else: a miss (the entry is rebuilt and replaced)
        return None


def _cache_hit(path, module, target):
    where = Location(path, 0, 0)
    contents = _read(path)
    if contents.signer is None or contents.manifest.get("target", "cpu") != target or contents.files["module.ir"] != str(module).encode():
        return None
    _check_module(contents, module, where, with_globals=False)
    return _gpu_code(contents, module, "cache", where) if target == "cuda" else _native(contents, where)


def store_in_cache(exe):
    try:
        key = trust.own_key(create=True)
        files = _members(exe, with_globals=False)
        target = getattr(exe, "target", "cpu")
        path = _cache_path(exe.module, target, getattr(exe, "arch", ""), getattr(exe, "profiled", False))
        _write_zip(path, files, _manifest(exe, files), key)
    except (OSError, DiagnosticError):
        pass  # a read-only or full cache directory, no key (or no libdevice to make PTX) only costs speed
