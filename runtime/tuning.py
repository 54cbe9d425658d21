"""Tile sizes measured per product shape on this host (`mlc tune`, mlc/tune.py), kept in the cache
directory as one JSON table per host, and applied by the compiler driver to later compiles: each
mlc.matmul or mlc.conv2d whose shape the table holds gets `mlc.tile = [mc, kc]`, which the lowering
hands to the tile pass (passes/tile.py). Without a table the tile pass's options decide, the same on
every machine; compiled code is cached apart for each table (`digest`).

    {"format": "mlc-tuning", "version": 1, "host": {...}, "entries": {key: [mc, kc], ...}}

A key is an op's name, its operand types and the attributes that shape its kernel, as text. A table
that cannot be read or is for another host is no table (a cache: `mlc tune` writes it again)."""
from __future__ import annotations

import functools
import hashlib
import json
import os

from mlc.ir.attributes import to_attr
from mlc.ir.dialects.mlc import Matmul

from .files import cache_dir, write_atomically
from .jit import host_key

FORMAT, VERSION = "mlc-tuning", 1
TUNED = ("mlc.matmul", "mlc.conv2d")
SHAPING = {"mlc.matmul": Matmul.MARKS, "mlc.conv2d": ("stride", "padding", "dilation", "groups")}


def key(op) -> str:
    """What an op's best tile sizes depend on: its name, operand types and kernel-shaping attributes."""
    attrs = ", ".join(f"{name} = {op.attributes[name]}" for name in SHAPING[op.name] if name in op.attributes)
    return f"{op.name}{f' {{{attrs}}}' if attrs else ''} : ({', '.join(map(str, op.operand_types))})"


def tuned_ops(module) -> list:
    """The products and convolutions of a module's functions (inside fusions too) that the tile pass
    blocks (f32 and f64)."""
    return [op for f in module.functions.values() for op in f.body.walk()
            if op.name in TUNED and op.operand_types[0].element.name in ("f32", "f64")]


def path() -> str:
    host = hashlib.sha256(json.dumps(host_key(), sort_keys=True).encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"tuning-{host}.json")


def load() -> dict:
    """This host's table: {key: [mc, kc]} (empty where there is none, or none that can be read)."""
    return _load(path(), *_stamp(path()))


@functools.lru_cache(maxsize=4)
def _load(where: str, size: int, mtime: float) -> dict:
    try:
        with open(where, encoding="utf-8") as f:
            table = json.load(f)
        entries = table["entries"]
        if table.get("format") != FORMAT or table.get("version") != VERSION or table.get("host") != host_key():
            return {}
        return {k: [int(mc), int(kc)] for k, (mc, kc) in entries.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _stamp(where: str) -> tuple:
    try:
        st = os.stat(where)
        return st.st_size, st.st_mtime
    except OSError:
        return -1, 0.0


def save(entries: dict) -> str:
    """Merge `entries` into this host's table (atomically); returns the table's path."""
    where = path()
    table = {"format": FORMAT, "version": VERSION, "host": host_key(), "entries": {**load(), **entries}}
    write_atomically(where, json.dumps(table, indent=1, sort_keys=True).encode())
    return where


def digest() -> str:
    """A hash of this host's table ("" without one): compiled code is cached apart per table."""
    entries = load()
    return hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest() if entries else ""


def annotate(module) -> None:
    """Give each product and convolution this host's table holds (and that has none yet) its `mlc.tile`."""
    entries = load()
    for op in tuned_ops(module) if entries else []:
        sizes = entries.get(key(op))
        if sizes is not None and "mlc.tile" not in op.attributes:
            op.attributes["mlc.tile"] = to_attr(list(sizes))
