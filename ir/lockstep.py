"""The GPU half of the interpreter: a `gpu.launch` runs block after block, each block in lockstep.

Inside a launch every scalar is a numpy array over the block's threads (a vector: lanes x threads), and
`mask` says which threads are running: a `loop.if` or a `loop.for` whose trip count differs between
threads runs its body under a narrower mask, as a GPU's divergent warps do. Ops with an
`interpret_lanes(ins, op, block)` hook (memory, control flow, the gpu ops) say what they do per thread;
every other op inside a launch is pure and its `interpret` kernel simply runs on the arrays.

The interpreter is also a race detector. Two accesses to one element, at least one a write, by two
threads with nothing ordering them are a located error: in the same block with no `gpu.barrier`
between them, or in two blocks of one launch (blocks are not ordered at all). So is a barrier that
not every thread of the block reaches, and a warp shuffle that not every thread of the warp runs.
Shared memory starts as NaN in every block, so a read before any write shows in the results.
"""
from __future__ import annotations

import math

import numpy as np

from .diagnostics import error
from .dialects.mlc import RuntimeCheck
from .dialects.shapes import fmt_shape
from .registry import TERMINATOR
from .types import ElementType, MemRefType, VectorType, round_to_element

WARP = 32


class Launch:
    """One execution of a gpu.launch: its blocks run one after another, sharing the race records."""

    def __init__(self, interp, op, grid: list, block: list):
        self.interp, self.op, self.grid, self.block = interp, op, grid, block
        self.threads = math.prod(block)
        self.accesses: dict[int, Accesses] = {}
        self.epoch = 0

    def run(self, env: dict):
        region = self.op.regions[0]
        for b in np.ndindex(*reversed(self.grid)):
            block_ids = list(reversed(b))
            linear = int(np.ravel_multi_index(b, tuple(reversed(self.grid)))) if b else 0
            ThreadBlock(self, block_ids, linear).run_launch_body(region, env)
            self.accesses = {k: a for k, a in self.accesses.items() if a.space != "shared"}

    def accesses_of(self, buffer: np.ndarray, space: str) -> "Accesses":
        a = self.accesses.get(id(buffer))
        if a is None:
            a = self.accesses[id(buffer)] = Accesses(buffer, space)
        return a


class ThreadBlock:
    def __init__(self, launch: Launch, block_ids: list, linear: int):
        self.launch, self.interp = launch, launch.interp
        self.block_ids, self.linear = block_ids, linear
        self.size = launch.threads
        self.thread = np.arange(self.size)
        self.global_thread = linear * self.size + self.thread
        self.mask = np.ones(self.size, bool)
        self.async_copies: list = []   # gpu.copy_async issued since the last commit
        self.async_groups: list = []   # committed groups in flight, oldest first
        launch.epoch += 1  # accesses of earlier blocks are never ordered with this one's

    # --- running regions -------------------------------------------------------------------------------
    def run_launch_body(self, region, env):
        ids = [np.full(self.size, i, np.int64) for i in self.block_ids]
        tids = np.unravel_index(self.thread, tuple(reversed(self.launch.block)))[::-1]
        self.run_region(region, ids + [t.astype(np.int64) for t in tids], env)

    def run_region(self, region, args, env=None) -> list:
        env = dict(self.interp.env if env is None else env)
        block = region.blocks[0]
        env.update(zip(block.args, args))
        outer, self.interp.env = self.interp.env, env
        try:
            for op in block:
                ins = [env[v] for v in op.operands]
                if TERMINATOR in op.opdef.traits:
                    return ins
                env.update(zip(op.results, self.run_op(op, ins)))
            return []
        finally:
            self.interp.env = outer

    def under(self, mask, region, args) -> list | None:
        """The region's results, run by the threads in `mask` only (None when there are none)."""
        if not mask.any():
            return None
        outer, self.mask = self.mask, mask
        try:
            return self.run_region(region, args)
        finally:
            self.mask = outer

    def run_op(self, op, ins) -> list:
        hook = getattr(op.opdef, "interpret_lanes", None)
        try:
            with np.errstate(all="ignore"):
                out = hook(ins, op, self) if hook else op.opdef.interpret(ins, op, self.interp)
        except RuntimeCheck as e:
            raise error(op.loc, str(e), op.name) from None
        except (ValueError, IndexError, TypeError) as e:
            raise error(op.loc, f"at run time: {e}", op.name) from None
        outs = out if isinstance(out, (list, tuple)) else [out]
        return [self.per_thread(v, r.type) for v, r in zip(outs, op.results)]

    def per_thread(self, value, t):
        """value as every thread holds it: scalars (threads,), vectors (lanes, threads), buffers as they are."""
        if isinstance(t, MemRefType):
            return value
        element = t.element if isinstance(t, VectorType) else t
        shape = (t.shape[0], self.size) if isinstance(t, VectorType) else (self.size,)
        value = round_to_element(np.asarray(value), element) if isinstance(element, ElementType) else np.asarray(value)
        return np.broadcast_to(value, shape)

    # --- memory ----------------------------------------------------------------------------------------
    def elements(self, op, buffer: np.ndarray, indices: list, lanes: int = 0):
        """The running threads and the flat element each reads (lanes: each reads `lanes` consecutive
        elements along the last dim, one row per lane), bounds-checked."""
        active = np.nonzero(self.mask)[0]
        idx = [np.asarray(i, np.int64)[active] if np.ndim(i) else np.full(len(active), int(i), np.int64) for i in indices]
        for axis, (i, n) in enumerate(zip(idx, buffer.shape)):
            reach = i + (lanes - 1 if lanes and axis == buffer.ndim - 1 else 0)
            bad = (i < 0) | (reach >= n)
            if bad.any():
                k = int(np.argmax(bad))
                what = f"{lanes} lanes from index {int(i[k])}" if lanes else f"index {int(i[k])}"
                raise RuntimeCheck(f"{what} is out of bounds for dim {axis} of a buffer of shape {fmt_shape(buffer.shape)} "
                                   f"(thread {int(active[k])} of block {self.block_ids})")
        flat = np.ravel_multi_index(idx, buffer.shape) if buffer.ndim else np.zeros(len(active), np.int64)
        if lanes and op.attr("aligned") and (flat % lanes).any():
            k = int(np.argmax(flat % lanes != 0))
            raise RuntimeCheck(f"an aligned {lanes}-lane access starts at element {int(flat[k])} of a buffer of shape "
                               f"{fmt_shape(buffer.shape)}, not a multiple of {lanes} (thread {int(active[k])} of block {self.block_ids})")
        if lanes:
            flat = flat[None, :] + np.arange(lanes)[:, None]
        return active, flat

    def load(self, op, buffer, indices, lanes: int = 0, space: str | None = None):
        active, flat = self.elements(op, buffer, indices, lanes)
        self.record(op, buffer, active, flat, write=False, space=space)
        shape = (lanes, self.size) if lanes else (self.size,)
        out = np.zeros(shape, buffer.dtype)
        out[..., active] = buffer.reshape(-1)[flat]
        return out

    def store(self, op, value, buffer, indices, lanes: int = 0, space: str | None = None):
        active, flat = self.elements(op, buffer, indices, lanes)
        self.record(op, buffer, active, flat, write=True, space=space)
        buffer.reshape(-1)[flat] = np.broadcast_to(value, flat.shape[:-1] + (self.size,))[..., active]

    def record(self, op, buffer, active, flat, write: bool, space: str | None = None):
        """Checks and notes the access for races; `space` is the buffer's memory (by default that of
        the op's buffer operand: 0 for reads, 1 for writes)."""
        if space is None:
            space = op.operand_types[1 if write else 0].space
        threads = np.broadcast_to(self.global_thread[active], flat.shape).reshape(-1)
        race = self.launch.accesses_of(buffer, space).access(flat.reshape(-1), threads, write, self)
        if race is not None:
            element, mine, other = race
            where = ", ".join(str(int(i)) for i in np.unravel_index(element, buffer.shape))
            raise error(op.loc, f"data race: thread {self.describe(mine)} {'writes' if write else 'reads'} element [{where}] "
                                f"of a {space or 'global'} buffer that {other} with nothing ordering the two", op.name)

    def describe(self, global_thread: int) -> str:
        return f"{global_thread % self.size} of block {global_thread // self.size}"

    def barrier(self, op):
        if not self.mask.all():
            k = int(np.argmin(self.mask))
            raise error(op.loc, f"barrier under divergent control flow: thread {k} of block {self.block_ids} does not reach it",
                        op.name)
        self.launch.epoch += 1


class Accesses:
    """Who last wrote and who read each element of one buffer during a launch (-1: no one; a reader of
    -2: several threads), and in which epoch (the epoch changes at every barrier and block)."""

    def __init__(self, buffer: np.ndarray, space: str):
        n = buffer.size
        self.space = space
        self.buffer = buffer  # held, so its id is not reused while the records live
        self.writer, self.write_epoch = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        self.reader, self.read_epoch = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
        self.reading_block = np.full(n, -1, np.int64)  # -2: several blocks read it

    def access(self, flat, threads, write: bool, block: ThreadBlock):
        """Records the access; a race as (element, this thread, who else touched it) or None."""
        size, epoch = block.size, block.launch.epoch
        elements, first, counts = np.unique(flat, return_index=True, return_counts=True)
        mine = threads[first]
        if write and (counts > 1).any():
            k = int(np.argmax(counts > 1))
            others = threads[flat == elements[k]]
            return int(elements[k]), int(others[1]), f"thread {block.describe(int(others[0]))} writes at the same time"
        w = self.writer[elements]
        # a write by another thread of this block since the last barrier, or by another block
        bad = (w >= 0) & (w != mine) & ((self.write_epoch[elements] == epoch) | (w // size != block.linear))
        if bad.any():
            k = int(np.argmax(bad))
            return int(elements[k]), int(mine[k]), f"thread {block.describe(int(w[k]))} wrote"
        if write:
            r = self.reader[elements]
            bad = (self.read_epoch[elements] == epoch) & (r != -1) & (r != mine)
            rb = self.reading_block[elements]
            bad_block = (rb != -1) & (rb != block.linear)
            if (bad | bad_block).any():
                k = int(np.argmax(bad | bad_block))
                other = (f"thread {block.describe(int(r[k]))}" if r[k] >= 0 else "other threads") if bad[k] else \
                    (f"block {int(rb[k])}" if rb[k] >= 0 else "other blocks")
                return int(elements[k]), int(mine[k]), other + " read"
            self.writer[elements], self.write_epoch[elements] = mine, epoch
            return None
        new = np.where(counts > 1, -2, mine)
        old = self.reader[elements]
        shared = (self.read_epoch[elements] == epoch) & (old != -1)
        self.reader[elements] = np.where(shared & (old != new), -2, new)
        self.read_epoch[elements] = epoch
        rb = self.reading_block[elements]
        self.reading_block[elements] = np.where((rb == -1) | (rb == block.linear), block.linear, -2)
        return None
