"""The `gpu` dialect: kernels on the loop level (MLIR's gpu dialect, smaller).

    gpu.launch %blocks {block = [256]} : index {
    ^bb0(%bid: index, %tid: index):
      %tile = gpu.shared_alloc : memref<256xf32, shared>
      ...
      gpu.barrier
      gpu.terminator
    }

A launch runs its body once per thread: `grid` blocks (its index operands, one to three dims) of
`block` threads (an attribute, one to three dims, at most 1024 threads). The body's arguments are the
block's ids, then the thread's, one per dim. It reads values from the host code around it (buffer
handles, sizes, scalars) and writes only memory: a launch has no results. Shared memory
(`memref<..., shared>`, static shapes) is allocated at the top of the body, one per block.

On the interpreter a launch runs block by block, each in lockstep, and checks for data races
(ir/lockstep.py).
"""
from __future__ import annotations

import math

import numpy as np

from ..lockstep import WARP, Launch as LaunchRun
from .mlc import RuntimeCheck
from ..registry import PLACED, PURE, READS, TERMINATOR, Attr, OpDef, Terminator, VerifyError
from ..types import ERROR, MemRefType, VectorType, f32, i1, i32, index

MAX_THREADS = 1024


def _launch_of(op):
    p = op.parent_op
    while p is not None and p.name != "gpu.launch":
        p = p.parent_op
    return p


class Launch(OpDef):
    name = "gpu.launch"
    operands = (1, 3)
    results = 0
    regions = 1
    attrs = {"block": Attr("ints", required=True)}

    @staticmethod
    def infer(op, ctx):
        for i, t in enumerate(op.operand_types):
            if t != index:
                raise VerifyError(f"grid size {i} must be an index, got {t}")
        block = list(op.attr("block"))
        if not 1 <= len(block) <= 3 or min(block) < 1 or math.prod(block) > MAX_THREADS:
            raise VerifyError(f"'block' must be 1 to 3 positive sizes of at most {MAX_THREADS} threads in all, got {block}")
        return []

    @staticmethod
    def verify(op, ctx):
        args = op.regions[0].blocks[0].args
        want = len(op.operands) + len(op.attr("block"))
        if len(args) != want or any(a.type != index for a in args):
            raise VerifyError(f"the body takes {want} indices: the block ids, then the thread ids")
        for inner in op.regions[0].walk():
            if inner.name in ("gpu.launch", "mem.alloc", "mem.dealloc", "mem.from_tensor", "mem.to_tensor") or \
                    (inner.name.startswith(("mlc.", "func.")) and inner.name != "func.return"):
                raise VerifyError(f"'{inner.name}' cannot run inside a gpu.launch")

    @staticmethod
    def captured(op) -> list:
        """The values the body reads from the host code around it, in order of first use: what a
        compiled kernel takes as parameters."""
        region = op.regions[0]
        inside = {r for o in region.walk() for r in o.results} | \
            {a for o in [op, *region.walk()] for rg in o.regions for b in rg.blocks for a in b.args}
        return list(dict.fromkeys(v for o in region.walk() for v in o.operands if v not in inside))

    @staticmethod
    def interpret(ins, op, ctx):
        grid = [int(g) for g in ins]
        if min(grid) < 0:
            raise RuntimeCheck(f"grid sizes must not be negative, got {grid}")
        if min(grid) > 0:
            LaunchRun(ctx, op, grid, list(op.attr("block"))).run(ctx.env)
        return []


def kernel_names(module) -> list:
    """(name, gpu.launch) of every kernel of a module: @f's launches, in order, are f_k0, f_k1, ..."""
    return [(f"{fname}_k{k}", launch) for fname, f in module.functions.items()
            for k, launch in enumerate(op for op in f.body.walk() if op.name == "gpu.launch")]


class LaunchTerminator(Terminator):
    name = "gpu.terminator"
    parent = "gpu.launch"
    traits = {TERMINATOR, PURE}


def _inside_launch(op, ctx):
    if _launch_of(op) is None:
        raise VerifyError("must be inside a gpu.launch")


class _Dim(OpDef):
    """The launch's size along `axis` (1 beyond its dims), the same for every thread."""
    results = 1
    traits = {PURE, PLACED}
    attrs = {"axis": Attr("int", 0)}
    sizes = ""  # the launch's attribute: "block" or "grid"
    verify = staticmethod(_inside_launch)

    @staticmethod
    def infer(op, ctx):
        if op.attr("axis") not in (0, 1, 2):
            raise VerifyError(f"'axis' must be 0, 1 or 2, got {op.attr('axis')}")
        return [index]

    @classmethod
    def interpret_lanes(cls, ins, op, block):
        dims = getattr(block.launch, cls.sizes)
        return dims[op.attr("axis")] if op.attr("axis") < len(dims) else 1


class BlockDim(_Dim):
    """Threads per block along `axis`."""
    name = "gpu.block_dim"
    sizes = "block"


class GridDim(_Dim):
    """Blocks in the grid along `axis`."""
    name = "gpu.grid_dim"
    sizes = "grid"


class SharedAlloc(OpDef):
    """The block's own buffer in shared memory; NaN (or an unlikely integer) until written."""
    name = "gpu.shared_alloc"
    operands = 0
    traits = {PLACED}

    @staticmethod
    def infer(op, ctx):
        if not op.results:
            raise VerifyError("needs its result type, e.g. ': memref<256xf32, shared>'")
        t = op.results[0].type
        if t is not ERROR and (not isinstance(t, MemRefType) or t.space != "shared" or not t.is_static):
            raise VerifyError(f"the result must be a static memref in shared memory, got {t}")
        return [t]

    @staticmethod
    def verify(op, ctx):
        if op.parent_op is None or op.parent_op.name != "gpu.launch":
            raise VerifyError("must be at the top of a gpu.launch body")

    @staticmethod
    def interpret_lanes(ins, op, block):
        t = op.results[0].type
        return np.full(t.shape, np.nan if t.element.is_float else -77, t.element.np_dtype)


class Barrier(OpDef):
    """Waits for every thread of the block; their memory accesses before it happen before those after."""
    name = "gpu.barrier"
    results = 0
    traits = {PLACED}
    verify = staticmethod(_inside_launch)

    @staticmethod
    def interpret_lanes(ins, op, block):
        block.barrier(op)
        return []


SHUFFLES = {
    "xor": lambda lane, k: lane ^ k,
    "down": lambda lane, k: np.where(lane + k < WARP, lane + k, lane),
    "up": lambda lane, k: np.where(lane - k >= 0, lane - k, lane),
    "idx": lambda lane, k: k % WARP,
}


class Shuffle(OpDef):
    """The value of another thread of the warp (32 threads): lane ^ offset (`xor`), lane + offset
    (`down`, keeping its own past the end), lane - offset (`up`), or lane `offset` (`idx`). Every
    thread of the warp must run it."""
    name = "gpu.shuffle"
    operands = 2
    traits = {PURE, PLACED}
    attrs = {"mode": Attr("str", required=True, choices=tuple(SHUFFLES))}

    @staticmethod
    def infer(op, ctx):
        value, offset = op.operand_types
        if value not in (f32, i32):
            raise VerifyError(f"shuffles 32-bit values (f32, i32), got {value}")
        if offset != index:
            raise VerifyError(f"the offset must be an index, got {offset}")
        return [value]

    verify = staticmethod(_inside_launch)

    @staticmethod
    def interpret_lanes(ins, op, block):
        _whole_warps(block, "the shuffle")
        lane = block.thread % WARP
        source = block.thread - lane + SHUFFLES[op.attr("mode")](lane, np.asarray(ins[1], np.int64))
        return np.broadcast_to(ins[0], (block.size,))[source]



# --- tensor cores -------------------------------------------------------------------------------------------

def _fragment_places():
    """Where each thread's fragment elements sit in the m16n8k16 tile (the PTX ISA's layout for
    mma.sync.aligned.m16n8k16.row.col): g = lane / 4, t = lane % 4."""
    lane, = np.indices((WARP,))
    g, t = lane // 4, lane % 4
    i8, i4 = np.arange(8)[:, None], np.arange(4)[:, None]
    a = (g + 8 * (i8 // 2 % 2), 2 * t + i8 % 2 + 8 * (i8 // 4))   # A: 16 x 16, 8 per thread
    b = (2 * t + i4 % 2 + 8 * (i4 // 2), np.broadcast_to(g, (4, WARP)))  # B: 16 x 8, 4 per thread
    c = (g + 8 * (i4 // 2), 2 * t + i4 % 2)                       # C and D: 16 x 8, 4 per thread
    return a, b, c


MMA_A, MMA_B, MMA_C = _fragment_places()


class MmaSync(OpDef):
    """D = A @ B + C on one 16 x 8 x 16 tile by the 32 threads of a warp together (tensor cores:
    mma.sync m16n8k16, f16 or bf16 in, f32 sums). Each thread holds fragments: 8 elements of A, 4 of B, 4 of C
    and of D, placed as the PTX ISA lays them out (g = lane / 4, t = lane % 4):

        a[i] = A[g + 8 (i/2 % 2), 2t + i%2 + 8 (i/4)]   b[i] = B[2t + i%2 + 8 (i/2), g]
        c[i] = C[g + 8 (i/2), 2t + i%2]                   (d as c)

        %d = gpu.mma_sync %a, %b, %c : (vector<8xf16>, vector<4xf16>, vector<4xf32>) -> vector<4xf32>

    Every thread of the warp must run it."""
    name = "gpu.mma_sync"
    operands = 3
    traits = {PURE, PLACED}
    SIGNATURES = [(f"vector<8x{e}>", f"vector<4x{e}>", "vector<4xf32>") for e in ("f16", "bf16")]

    @classmethod
    def infer(cls, op, ctx):
        got = tuple(str(t) for t in op.operand_types)
        if got not in cls.SIGNATURES:
            raise VerifyError(f"takes fragments ({', '.join(cls.SIGNATURES[0])}) or the same in bf16, got ({', '.join(got)})")
        return [op.operand_types[2]]

    verify = staticmethod(_inside_launch)

    @staticmethod
    def interpret_lanes(ins, op, block):
        _whole_warps(block, "the mma")
        a, b, c = (np.broadcast_to(x, (n, block.size)) for x, n in zip(ins, (8, 4, 4)))
        d = np.empty((4, block.size), np.float32)
        for w in range(block.size // WARP):
            lanes = slice(w * WARP, (w + 1) * WARP)
            A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
            A[MMA_A] = a[:, lanes]
            B[MMA_B] = b[:, lanes]
            C[MMA_C] = c[:, lanes]
            d[:, lanes] = (A @ B + C)[MMA_C]
        return d


def _whole_warps(block, what: str):
    if block.size % WARP:
        raise RuntimeCheck(f"{what} needs whole warps: the block has {block.size} threads")
    warps = block.mask.reshape(-1, WARP)
    partial = warps.any(axis=1) & ~warps.all(axis=1)
    if partial.any():
        raise RuntimeCheck(f"warp {int(np.argmax(partial))} of block {block.block_ids} runs {what} on some of its "
                           f"threads only (divergent control flow)")


class LoadMatrix(OpDef):
    """`count` 8 x 8 matrices of 16-bit elements from shared memory, spread over the warp the way
    gpu.mma_sync takes its fragments (ldmatrix.sync.aligned.m8n8). Each thread names one row: lane l
    gives row l % 8 of matrix l / 8 as the 8 elements from %tile[%row, %col] on. Thread l then holds,
    of each matrix i, elements [l / 4][2 (l % 4) + j] for j = 0, 1 (with `transpose`: [2 (l % 4) + j][l / 4])
    at positions 2i + j of its fragment.

        %a = gpu.ldmatrix %tile, %row, %col {count = 4} : (memref<64x16xf16, shared>, index, index) -> vector<8xf16>

    Every thread of the warp must run it."""
    name = "gpu.ldmatrix"
    operands = 3
    traits = {READS, PLACED}
    attrs = {"count": Attr("int", 4), "transpose": Attr("bool", False)}
    verify = staticmethod(_inside_launch)

    @staticmethod
    def infer(op, ctx):
        tile, row, col = op.operand_types
        if not isinstance(tile, MemRefType) or tile.space != "shared" or tile.rank != 2 or tile.element.name != "f16":
            raise VerifyError(f"reads a 2-d f16 memref in shared memory, got {tile}")
        if (row, col) != (index, index):
            raise VerifyError(f"the row and column must be indices, got {row}, {col}")
        if op.attr("count") not in (1, 2, 4):
            raise VerifyError(f"'count' must be 1, 2 or 4 matrices, got {op.attr('count')}")
        return [VectorType((2 * op.attr("count"),), tile.element)]

    @staticmethod
    def interpret_lanes(ins, op, block):
        _whole_warps(block, "ldmatrix")
        count, lane = op.attr("count"), block.thread % WARP
        giving = block.mask & (lane < 8 * count)
        outer, block.mask = block.mask, giving
        try:  # each giving thread reads its row: 8 elements
            rows = block.load(op, ins[0], ins[1:], lanes=8)  # (8, threads)
        finally:
            block.mask = outer
        out = np.empty((2 * count, block.size), ins[0].dtype)
        base = block.thread - lane
        for i in range(count):
            for j in range(2):
                r, c = (lane // 4, 2 * (lane % 4) + j) if not op.attr("transpose") else (2 * (lane % 4) + j, lane // 4)
                out[2 * i + j] = rows[c, base + 8 * i + r]
        return out


# --- asynchronous copies to shared memory -------------------------------------------------------------------

class CopyAsync(OpDef):
    """16 bytes from global to shared memory, in the background (cp.async): the elements from
    %src[indices] on land at %dst[indices] on when a gpu.async_wait lets their group finish; until
    then %dst holds what it held. Where %valid is false the destination gets zeros and %src is not read.

        gpu.copy_async %a, %i, %k, %tile, %r, %c, %valid : memref<?x64xf16>, index, index, memref<64x16xf16, shared>, index, index, i1
    """
    name = "gpu.copy_async"
    operands = (4, None)
    results = 0
    traits = {PLACED}
    verify = staticmethod(_inside_launch)

    @staticmethod
    def split(items, src_rank: int):
        """(src, its indices, dst, its indices, valid) of the op's operands (or their values)."""
        return items[0], list(items[1:1 + src_rank]), items[1 + src_rank], list(items[2 + src_rank:-1]), items[-1]

    @classmethod
    def infer(cls, op, ctx):
        types = op.operand_types
        src = types[0]
        if not isinstance(src, MemRefType) or src.space:
            raise VerifyError(f"copies from a memref in global memory, got {src}")
        if len(types) < src.rank + 3:
            raise VerifyError(f"takes the source, {src.rank} indices, the destination, its indices and the valid flag")
        _, src_at, dst, dst_at, valid = cls.split(types, src.rank)
        if not isinstance(dst, MemRefType) or dst.space != "shared" or dst.element != src.element:
            raise VerifyError(f"copies into a memref of {src.element} in shared memory, got {dst}")
        if len(dst_at) != dst.rank or any(t != index for t in src_at + dst_at) or valid != i1:
            raise VerifyError("takes an index per dim of the source and of the destination, then an i1")
        return []

    @staticmethod
    def elements(op) -> int:
        return 16 // op.operand_types[0].element.np_dtype.itemsize

    @classmethod
    def interpret_lanes(cls, ins, op, block):
        src, src_at, dst, dst_at, valid = cls.split(ins, op.operand_types[0].rank)
        running = block.mask & np.broadcast_to(np.asarray(valid, bool), (block.size,))
        block.async_copies.append((op, block.mask.copy(), running, src, [np.broadcast_to(v, (block.size,)).copy() for v in src_at],
                                   dst, [np.broadcast_to(v, (block.size,)).copy() for v in dst_at]))
        return []


class AsyncCommit(OpDef):
    """Closes the group of this thread's gpu.copy_async ops issued since the last commit."""
    name = "gpu.async_commit"
    results = 0
    traits = {PLACED}
    verify = staticmethod(_inside_launch)

    @staticmethod
    def interpret_lanes(ins, op, block):
        block.async_groups.append(block.async_copies)
        block.async_copies = []
        return []


class AsyncWait(OpDef):
    """Waits until at most `pending` committed groups of copies are still in flight: the older ones
    have landed (visible to this thread; to others after a gpu.barrier)."""
    name = "gpu.async_wait"
    results = 0
    traits = {PLACED}
    attrs = {"pending": Attr("int", 0)}
    verify = staticmethod(_inside_launch)

    @staticmethod
    def interpret_lanes(ins, op, block):
        keep = op.attr("pending")
        finished = block.async_groups[:len(block.async_groups) - keep] if keep else block.async_groups
        block.async_groups = block.async_groups[len(finished):]
        outer = block.mask
        try:
            for group in finished:
                for copy, issued, running, src, src_at, dst, dst_at in group:
                    n = CopyAsync.elements(copy)
                    block.mask = running
                    values = block.load(copy, src, src_at, lanes=n, space="") if running.any() else np.zeros((n, block.size), src.dtype)
                    block.mask = issued
                    block.store(copy, np.where(running, values, 0).astype(dst.dtype), dst, dst_at, lanes=n, space="shared")
        finally:
            block.mask = outer
        return []
