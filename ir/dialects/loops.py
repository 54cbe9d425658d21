"""Loop-level dialects: buffers (`mem`), loops (`loop`), scalar arithmetic (`arith`) and short vectors
(`vector`).

    %n = mem.dim %x {axis = 0} : (memref<?x4xf32>) -> index
    %y = mem.alloc %n : (index) -> memref<?x4xf32>
    loop.for %c0, %n {step = 1, parallel} : index, index {
    ^bb0(%i: index):
      %v = mem.load %x, %i, %j : (memref<?x4xf32>, index, index) -> f32
      %e = arith.exp %v : (f32) -> f32
      mem.store %e, %y, %i, %j : f32, memref<?x4xf32>, index, index
      loop.yield
    }

The scalar `arith` ops are the mlc elementwise ops on scalars: they are generated from the same
tables (ir/dialects/mlc.py), so a scalar `arith.exp` means exactly what `mlc.exp` means per element;
they apply lane by lane to vectors (`vector<8xf32>`), which `vector.load` reads from the contiguous last
dim of a buffer — the register tiles of matmul are built from them.
On the interpreter a memref is a mutable numpy array, an index a Python int, a scalar a numpy scalar.
"""
from __future__ import annotations

import numpy as np

from ..attributes import BoolAttr, FloatAttr, IntAttr
from ..diagnostics import error
from ..registry import ELEMENTWISE, PURE, READS, TERMINATOR, WRITES, Attr, OpDef, Probe, Terminator, VerifyError
from ..types import ElementType, MemRefType, TensorType, VectorType, i1, index
from . import mlc
from .mlc import RuntimeCheck
from .shapes import fmt_shape


def _memref(t, what="operand 0") -> MemRefType:
    if not isinstance(t, MemRefType):
        raise VerifyError(f"{what} must be a memref, got {t}")
    return t


def _scalar(t, what) -> ElementType:
    if not isinstance(t, ElementType):
        raise VerifyError(f"{what} must be a scalar, got {t}")
    return t


def _indices(types, rank, first):
    if len(types) != rank:
        raise VerifyError(f"expects {rank} indices for a rank-{rank} memref, got {len(types)}")
    for i, t in enumerate(types):
        if t != index:
            raise VerifyError(f"operand {first + i} must be an index, got {t}")


def _store_into(op, value) -> list:
    """Checks `store %value, %buffer, %indices...` for a scalar or vector value."""
    t = _memref(op.operand_types[1], "operand 1")
    if getattr(value, "element", value) != t.element:
        raise VerifyError(f"stores {'a ' if isinstance(value, ElementType) else ''}{value} into a buffer of {t.element}")
    _indices(op.operand_types[2:], t.rank, 2)
    return []


def _checked(buffer: np.ndarray, idx: tuple):
    for k, (i, n) in enumerate(zip(idx, buffer.shape)):
        if not 0 <= i < n:
            raise RuntimeCheck(f"index {i} is out of bounds for dim {k} of a buffer of shape {fmt_shape(buffer.shape)}")
    return idx


# ---------------------------------------------------------------------------------------------------
# mem: buffers

class Alloc(OpDef):
    """A new buffer; one index operand per `?` dim of the result type, in order. Its contents are
    undefined until written: the interpreter fills it with NaN (or an unlikely integer), so a read
    before a write shows up in the differential tests; native code does not initialise it."""
    name = "mem.alloc"
    operands = (0, None)

    @staticmethod
    def infer(op, ctx):
        if not op.results:
            raise VerifyError("needs its result type, e.g. ': (index) -> memref<?x4xf32>'")
        t = _memref(op.results[0].type, "result")
        if t.space:
            raise VerifyError(f"allocates host or global memory; {t.space} memory comes from gpu.shared_alloc")
        _indices(op.operand_types, t.shape.count(None), 0)
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        t = op.results[0].type
        sizes = iter(int(v) for v in ins)
        shape = [next(sizes) if d is None else d for d in t.shape]
        return np.full(shape, _garbage(t.element), t.element.np_dtype)


def _garbage(element):
    return np.nan if element.is_float else (True if element.is_bool else -77)


class Dim(OpDef):
    name = "mem.dim"
    operands = 1
    traits = {PURE}
    attrs = {"axis": Attr("int", required=True)}

    @staticmethod
    def infer(op, ctx):
        t = op.operand_types[0]
        if not isinstance(t, (MemRefType, TensorType)):
            raise VerifyError(f"operand 0 must be a memref or tensor, got {t}")
        if not 0 <= op.attr("axis") < t.rank:
            raise VerifyError(f"axis {op.attr('axis')} is out of range for rank {t.rank}")
        return [index]

    @staticmethod
    def interpret(ins, op, ctx):
        return ins[0].shape[op.attr("axis")]


class Load(OpDef):
    name = "mem.load"
    operands = (1, None)
    traits = {READS}

    @staticmethod
    def infer(op, ctx):
        t = _memref(op.operand_types[0])
        _indices(op.operand_types[1:], t.rank, 1)
        return [t.element]

    @staticmethod
    def interpret(ins, op, ctx):
        return ins[0][_checked(ins[0], tuple(int(i) for i in ins[1:]))]

    @staticmethod
    def interpret_lanes(ins, op, block):
        return block.load(op, ins[0], ins[1:])


class Store(OpDef):
    name = "mem.store"
    operands = (2, None)
    results = 0

    @staticmethod
    def infer(op, ctx):
        return _store_into(op, _scalar(op.operand_types[0], "operand 0 (the value)"))

    @staticmethod
    def interpret(ins, op, ctx):
        ins[1][_checked(ins[1], tuple(int(i) for i in ins[2:]))] = ins[0]
        return []

    @staticmethod
    def interpret_lanes(ins, op, block):
        block.store(op, ins[0], ins[1], ins[2:])
        return []


class Dealloc(OpDef):
    """Frees a buffer made by mem.alloc. The interpreter fills it with the garbage of a new one, so a
    read after the free shows up in the differential tests."""
    name = "mem.dealloc"
    operands = 1
    results = 0

    @staticmethod
    def infer(op, ctx):
        _memref(op.operand_types[0])
        return []

    @staticmethod
    def interpret(ins, op, ctx):
        ins[0][...] = _garbage(op.operand_types[0].element)
        return []


class Check(OpDef):
    """A run-time condition (e.g. two `?` dims agree); false is an error at this op's location."""
    name = "mem.check"
    operands = 1
    results = 0
    attrs = {"message": Attr("str", required=True), "op": Attr("str")}  # op: the checked op, for the report

    @staticmethod
    def infer(op, ctx):
        if op.operand_types[0] != i1:
            raise VerifyError(f"operand 0 must be i1, got {op.operand_types[0]}")
        return []

    @staticmethod
    def interpret(ins, op, ctx):
        if not ins[0]:
            raise error(op.loc, op.attr("message"), op.attr("op") or op.name)
        return []

    @staticmethod
    def interpret_lanes(ins, op, block):
        if not np.asarray(ins[0])[block.mask].all():
            raise error(op.loc, op.attr("message"), op.attr("op") or op.name)
        return []


class FromTensor(OpDef):
    """A buffer holding a copy of a tensor (at function entry and for constants)."""
    name = "mem.from_tensor"
    operands = 1

    @staticmethod
    def infer(op, ctx):
        t = op.operand_types[0]
        if not isinstance(t, TensorType):
            raise VerifyError(f"operand 0 must be a tensor, got {t}")
        return [MemRefType(t.shape, t.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(ins[0])


class ToTensor(OpDef):
    """The tensor value of a buffer (at function exit)."""
    name = "mem.to_tensor"
    operands = 1
    traits = {READS}

    @staticmethod
    def infer(op, ctx):
        t = _memref(op.operand_types[0])
        return [TensorType(t.shape, t.element)]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(ins[0])


class Reshape(OpDef):
    """The same memory in another shape, elements in the same row-major order (no copy): the tile
    pass reads a convolution's weights OIHW as the matrix [O, I*H*W] and writes its NCHW result as
    [N, C, H*W]. One index operand per `?` dim of the result, as for mem.alloc.

        %m = mem.reshape %w : (memref<64x3x3x3xf32>) -> memref<64x27xf32>"""
    name = "mem.reshape"
    operands = (1, None)
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        source = _memref(op.operand_types[0])
        if not op.results:
            raise VerifyError("needs its result type, e.g. ': (memref<4x4xf32>) -> memref<16xf32>'")
        t = _memref(op.results[0].type, "result")
        if t.element != source.element or t.space != source.space:
            raise VerifyError(f"views {source} as {t}: the element type and memory space must stay")
        _indices(op.operand_types[1:], t.shape.count(None), 1)
        if None not in t.shape + source.shape and np.prod(t.shape) != np.prod(source.shape):
            raise VerifyError(f"views {source} as {t}: the number of elements must stay")
        return [t]

    @staticmethod
    def interpret(ins, op, ctx):
        sizes = iter(int(v) for v in ins[1:])
        shape = tuple(next(sizes) if d is None else d for d in op.results[0].type.shape)
        if int(np.prod(shape)) != ins[0].size:
            raise RuntimeCheck(f"a buffer of shape {fmt_shape(ins[0].shape)} cannot be viewed as {fmt_shape(shape)}")
        view = ins[0].view()
        view.shape = shape  # (in place, never a copy: writes through the view reach the buffer)
        return view


class Subview(OpDef):
    """The buffer at one index of the leading dim, the same memory (no copy; MLIR's memref.subview
    of a single leading index, rank-reduced): a scan's step reads its slice of the sequence in place.

        %x_t = mem.subview %xs, %t : (memref<64x32x128xf32>, index) -> memref<32x128xf32>"""
    name = "mem.subview"
    operands = 2
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        source = _memref(op.operand_types[0])
        if source.rank < 1:
            raise VerifyError("needs a buffer of rank 1 or more")
        _indices(op.operand_types[1:], 1, 1)
        return [MemRefType(source.shape[1:], source.element, source.space)]

    @staticmethod
    def interpret(ins, op, ctx):
        (i,) = _checked(ins[0], (int(ins[1]),))
        return ins[0][i]  # (a numpy view: writes through it reach the buffer)


# ---------------------------------------------------------------------------------------------------
# loop: counted loops

class For(OpDef):
    """`for i in range(lb, ub, step)` over its region, whose first argument is the index. Values after
    the bounds are carried from one iteration to the next (MLIR's iter_args): the body receives them
    after the index, yields their next values, and the loop's results are the last ones (the initial
    values when it runs no iteration). `parallel` marks loops whose iterations are independent;
    `compact` asks for small code where the loop becomes a function of its own (LLVM's optsize): loops
    of scalar gathers, which LLVM's unrollers and vectorisers only enlarge (and take long to).

        %sum = loop.for %c0, %n, %zero {step = 1} : (index, index, f32) -> f32 {
        ^bb0(%i: index, %acc: f32):
          ...
          loop.yield %next : f32
        }
    """
    name = "loop.for"
    operands = (2, None)
    results = None
    regions = 1
    attrs = {"step": Attr("int", 1), "parallel": Attr("bool", False), "compact": Attr("bool", False)}

    @staticmethod
    def infer(op, ctx):
        for i, t in enumerate(op.operand_types[:2]):
            if t != index:
                raise VerifyError(f"bound {i} must be an index, got {t}")
        if op.attr("step") < 1:
            raise VerifyError(f"'step' must be positive, got {op.attr('step')}")
        carried = list(op.operand_types[2:])
        if carried and op.attr("parallel"):
            raise VerifyError("a parallel loop cannot carry values between iterations")
        return carried

    @staticmethod
    def verify(op, ctx):
        block = op.regions[0].blocks[0]
        expected = [index] + list(op.operand_types[2:])
        if [a.type for a in block.args] != expected:
            raise VerifyError(f"the body takes ({', '.join(map(str, expected))}): the index, then the carried values")

    @staticmethod
    def interpret(ins, op, ctx):
        region, carried = op.regions[0], list(ins[2:])
        for i in range(int(ins[0]), int(ins[1]), op.attr("step")):
            carried = ctx.run_region(region, [np.int64(i)] + carried)
        return carried

    @staticmethod
    def interpret_lanes(ins, op, block):
        """Each thread counts from its own lower bound to its own upper bound; the body runs for the
        threads still counting (divergence when they stop at different times)."""
        lb, ub, carried, step = ins[0], ins[1], list(ins[2:]), op.attr("step")
        for k in range(0, 1 << 62):
            iv = lb + k * step
            running = block.mask & (iv < ub)
            new = block.under(running, op.regions[0], [iv] + carried)
            if new is None:
                return carried
            carried = [np.where(running, n, c) for n, c in zip(new, carried)]


class If(OpDef):
    """A structured conditional: the first region if the condition holds, else the second; each ends
    with a loop.yield of the results.

        %r = loop.if %in_bounds : (i1) -> f32 {
          ...
          loop.yield %v : f32
        } {
          loop.yield %zero : f32
        }
    """
    name = "loop.if"
    operands = 1
    results = None
    regions = 2

    @staticmethod
    def infer(op, ctx):
        if op.operand_types[0] != i1:
            raise VerifyError(f"the condition must be i1, got {op.operand_types[0]}")
        return [r.type for r in op.results]

    @staticmethod
    def verify(op, ctx):
        for r in op.regions:
            if r.blocks[0].args:
                raise VerifyError("its regions take no arguments")

    @staticmethod
    def interpret(ins, op, ctx):
        return ctx.run_region(op.regions[0 if ins[0] else 1], [])

    @staticmethod
    def interpret_lanes(ins, op, block):
        taken = ins[0].astype(bool)
        then = block.under(block.mask & taken, op.regions[0], [])
        other = block.under(block.mask & ~taken, op.regions[1], [])
        if then is None or other is None:
            return then or other or [np.zeros((), r.type.np_dtype) for r in op.results]
        return [np.where(taken, a, b) for a, b in zip(then, other)]


class LoopYield(Terminator):
    name = "loop.yield"
    parent = ("loop.for", "loop.if")
    traits = {TERMINATOR, PURE}

    @staticmethod
    def check_values(op, owner):
        expected = list(owner.operand_types[2:]) if owner.name == "loop.for" else owner.result_types
        if list(op.operand_types) != expected:
            what = "the loop carries" if owner.name == "loop.for" else "the loop.if returns"
            raise VerifyError(f"yields ({', '.join(map(str, op.operand_types))}) but {what} ({', '.join(map(str, expected))})")


class Matmul(OpDef):
    """C = A @ B over buffers with an epilogue per element, before tiling (the `tile` pass turns it
    into the blocked, packed loop nest):

        mem.matmul %a, %b, %c, %n, %n : memref<4x?x64xf32>, memref<64x32xf32>, memref<4x?x32xf32>, index, index {
        ^bb0(%i: index, %j: index, %acc: f32):
          %y = arith.relu %acc : (f32) -> f32
          mem.yield %y : f32
        }

    The buffers' last two dims are the matrices; index operands pick one: first those of %a's leading
    dims, then %b's, then %c's (here %a[%n] and %c[%n]). `transpose_a`/`transpose_b` say the operand
    is stored transposed; `interleaved_a/b/c`, that the buffer's last index dim lies between its
    matrix dims (its element [x, y] is buf[..., x, h, y]). The epilogue gets the row, the column and
    the product there, and yields the element of C (`mem.yield %acc` for the product itself).
    `tile = [mc, kc]`: the tile pass's block of rows and slice of K for this product (measured by
    `mlc tune`), in place of its options."""
    name = "mem.matmul"
    operands = (3, None)
    results = 0
    regions = 1
    traits = {WRITES}
    attrs = {"transpose_a": Attr("bool", False), "transpose_b": Attr("bool", False), "interleaved_a": Attr("bool", False),
             "interleaved_b": Attr("bool", False), "interleaved_c": Attr("bool", False), "tile": Attr("ints")}

    @staticmethod
    def split(items, ranks) -> tuple[list, list]:
        """The op's operands (or their values) -> the three buffers, and the leading indices of each."""
        rest, leads = list(items[3:]), []
        for r in ranks:
            leads.append(rest[:r - 2])
            rest = rest[r - 2:]
        return list(items[:3]), leads

    @staticmethod
    def interleaved(op, which: int) -> bool:
        """Whether buffer `which` (0, 1, 2: a, b, c) holds its last index dim between its matrix dims."""
        return bool(op.attr("interleaved_" + "abc"[which]))

    @classmethod
    def matrix_axes(cls, op, which: int) -> tuple[int, int]:
        """The dims of buffer `which` that hold its matrix's rows and columns (as stored)."""
        r = op.operand_types[which].rank
        return (r - 3, r - 1) if cls.interleaved(op, which) else (r - 2, r - 1)

    @classmethod
    def place(cls, op, which: int, lead: list, x, y) -> list:
        """The indices of element [x, y] (as stored: a transposed operand's [k, i]) of buffer `which`'s
        matrix that its leading indices `lead` pick."""
        return lead[:-1] + [x, lead[-1], y] if cls.interleaved(op, which) else lead + [x, y]

    @classmethod
    def infer(cls, op, ctx):
        types = [_memref(t, f"operand {i}") for i, t in enumerate(op.operand_types[:3])]
        if any(t.rank < 2 for t in types) or len({t.element for t in types}) != 1:
            raise VerifyError("takes three buffers of one element type, each of rank >= 2")
        for i, t in enumerate(types):
            if cls.interleaved(op, i) and t.rank < 3:
                raise VerifyError(f"operand {i} is interleaved, so it needs rank >= 3, got {t}")
        leading = sum(t.rank - 2 for t in types)
        if len(op.operand_types) - 3 != leading:
            raise VerifyError(f"takes {leading} indices after its buffers (one per dim before their matrices), "
                              f"got {len(op.operand_types) - 3}")
        _indices(op.operand_types[3:], leading, 3)
        return []

    @staticmethod
    def verify(op, ctx):
        e = op.operand_types[2].element
        if [a.type for a in op.regions[0].blocks[0].args] != [index, index, e]:
            raise VerifyError(f"the epilogue takes (index, index, {e}): the row, the column and the product")

    @classmethod
    def interpret(cls, ins, op, ctx):
        (a, b, c), leads = cls.split(ins, [t.rank for t in op.operand_types[:3]])
        a, b, out = (cls._matrix(op, which, buf, [int(i) for i in lead]) for which, (buf, lead) in enumerate(zip((a, b, c), leads)))
        a = a.T if op.attr("transpose_a") else a
        b = b.T if op.attr("transpose_b") else b
        if a.shape[1] != b.shape[0] or out.shape != (a.shape[0], b.shape[1]):
            raise RuntimeCheck(f"a {fmt_shape(a.shape)} by {fmt_shape(b.shape)} product does not fit a {fmt_shape(out.shape)} buffer")
        product = (a.astype(np.float64) @ b.astype(np.float64)).astype(out.dtype) if a.dtype.kind == "f" else a @ b
        for i, j in np.ndindex(product.shape):
            out[i, j] = ctx.run_region(op.regions[0], [np.int64(i), np.int64(j), product[i, j]])[0]
        return []

    @classmethod
    def _matrix(cls, op, which, buf, lead):
        """The matrix (a view) that `lead` picks from buffer `which`."""
        if cls.interleaved(op, which):
            buf = np.swapaxes(buf, -3, -2)
        return buf[_checked(buf, tuple(lead))]


class Conv2d(OpDef):
    """A convolution over buffers with an epilogue per element, before tiling (the `tile` pass turns
    it into the register-tiled direct convolution, or into a product: gemm.py):

        out[n, o, y, x] = epilogue(n, o, y, x, sum over c, i, j of
                                   input[n, g*C + c, y*sy + i*dh, x*sx + j*dw] * w[o, c, i, j])

    with g = o's group (w is OIHW: C input channels per group) and stride = [sy, sx]. The input is
    already padded; the direct convolution (stride 1 along x) also reads up to 2 vectors (of 32
    bytes) past the last column it needs, so the input must have those columns too (lower-to-loops
    pads with them; tile checks at run time). `tile = [mc, kc]` as for mem.matmul, where it runs as a product."""
    name = "mem.conv2d"
    operands = 3
    results = 0
    regions = 1
    traits = {WRITES}
    attrs = {"stride": Attr("ints", [1, 1]), "dilation": Attr("ints", [1, 1]), "groups": Attr("int", 1), "tile": Attr("ints")}

    @staticmethod
    def infer(op, ctx):
        types = [_memref(t, f"operand {i}") for i, t in enumerate(op.operand_types)]
        if any(t.rank != 4 for t in types) or len({t.element for t in types}) != 1:
            raise VerifyError("takes the input, the weights (OIHW) and the result: buffers of rank 4 of one element type")
        return []

    @staticmethod
    def verify(op, ctx):
        e = op.operand_types[2].element
        if [a.type for a in op.regions[0].blocks[0].args] != [index] * 4 + [e]:
            raise VerifyError(f"the epilogue takes (index, index, index, index, {e}): n, o, y, x and the sum")

    @staticmethod
    def interpret(ins, op, ctx):
        x, w, out = ins
        (dh, dw), (sy, sx), groups = op.attr("dilation"), op.attr("stride"), op.attr("groups")
        n, o_ch, oh, ow = out.shape
        _, cg, kh, kw = w.shape
        if (kh - 1) * dh + sy * (oh - 1) >= x.shape[2] or (kw - 1) * dw + sx * (ow - 1) >= x.shape[3] or cg * groups != x.shape[1]:
            raise RuntimeCheck(f"a {fmt_shape(out.shape)} result of a {fmt_shape(w.shape)} kernel does not fit a "
                               f"{fmt_shape(x.shape)} input")
        acc, per = np.zeros(out.shape, np.float64), o_ch // groups
        for g in range(groups):
            xs = x[:, g * cg:(g + 1) * cg].astype(np.float64)
            for i in range(kh):
                for j in range(kw):
                    patch = xs[:, :, i * dh:i * dh + sy * (oh - 1) + 1:sy, j * dw:j * dw + sx * (ow - 1) + 1:sx]
                    acc[:, g * per:(g + 1) * per] += np.einsum("ncyx,oc->noyx", patch, w[g * per:(g + 1) * per, :, i, j])
        block = op.regions[0].blocks[0]
        if block.last.operands[0] is block.args[4]:  # the sum itself
            out[...] = acc
            return []
        for at in np.ndindex(out.shape):
            out[at] = ctx.run_region(op.regions[0], [np.int64(k) for k in at] + [out.dtype.type(acc[at])])[0]
        return []


class EpilogueYield(Terminator):
    """Ends the epilogue of mem.matmul or mem.conv2d: the element of the result."""
    name = "mem.yield"
    parent = ("mem.matmul", "mem.conv2d")
    traits = {TERMINATOR, PURE}

    @staticmethod
    def check_values(op, owner):
        e = owner.operand_types[2].element
        if list(op.operand_types) != [e]:
            raise VerifyError(f"yields ({', '.join(map(str, op.operand_types))}) but the result's element is {e}")


# ---------------------------------------------------------------------------------------------------
# arith: scalar arithmetic, from the mlc elementwise tables

class ScalarConstant(OpDef):
    name = "arith.constant"
    traits = {PURE}
    attrs = {"value": Attr("any", required=True)}

    @staticmethod
    def infer(op, ctx):
        a = op.attributes["value"]
        if isinstance(a, (IntAttr, FloatAttr)):
            return [a.type]
        if isinstance(a, BoolAttr):
            return [i1]
        raise VerifyError(f"'value' must be a number or boolean, got {a}")

    @staticmethod
    def interpret(ins, op, ctx):
        return op.attr("value")


def _scalar_family(base):
    """The arith twin of an mlc elementwise op: same element rules, same kernel, scalar types."""

    class Scalar(base):
        @classmethod
        def infer(cls, op, ctx):
            vectors = {t.shape for t in op.operand_types if isinstance(t, VectorType)}
            if len(vectors) > 1 or (vectors and not all(isinstance(t, VectorType) for t in op.operand_types)):
                raise VerifyError(f"operands must be all scalars or all vectors of one length, got "
                                  f"{', '.join(map(str, op.operand_types))}")
            types = [_scalar(getattr(t, "element", t), f"operand {i}") for i, t in enumerate(op.operand_types)]
            probe = Probe(op, [TensorType((), t) for t in types])
            elements = [r.element for r in base.infer(probe, ctx)]
            return [VectorType(next(iter(vectors)), e) for e in elements] if vectors else elements

        fold = staticmethod(lambda op, consts: None)
    return Scalar


REASSOCIATIVE = ("add", "mul", "maximum", "minimum")  # `{reassoc}`: a reduction may be regrouped (vectorised)


def _scalar_twin(name: str, base) -> None:
    """arith.<name>, the twin of an elementwise row (or of select)."""
    attrs = {**base.attrs, "reassoc": Attr("bool", False)} if name in REASSOCIATIVE else base.attrs
    type(f"Scalar{name.capitalize()}", (_scalar_family(base),),
         {"name": f"arith.{name}", "traits": base.traits - {"broadcasting"}, "attrs": attrs})


mlc.on_each_row(_scalar_twin)  # the rows declared so far, and any declared later
_scalar_twin("select", mlc.Select)


class BitOp(OpDef):
    """Integer bit operations for generated code (e.g. Philox): no tensor twin."""
    operands = 2
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        a, b = (_scalar(t, f"operand {i}") for i, t in enumerate(op.operand_types))
        if a != b or not a.is_int or a.is_bool:
            raise VerifyError(f"operands must be the same integer type, got {a} and {b}")
        return [a]

    @classmethod
    def interpret(cls, ins, op, ctx):
        a, b = (np.asarray(v) for v in ins)
        return cls.fn(a, b)


def _shift_right_logical(a, b):
    unsigned = {np.dtype(np.int64): np.uint64, np.dtype(np.int32): np.uint32, np.dtype(np.int8): np.uint8}[a.dtype]
    return (a.astype(a.dtype).view(unsigned) >> b.astype(unsigned)).view(a.dtype)


class BitXor(BitOp):
    name = "arith.xor"
    fn = staticmethod(np.bitwise_xor)


class BitShl(BitOp):
    name = "arith.shl"
    fn = staticmethod(np.left_shift)


class BitShru(BitOp):
    """Shift right, filling with zeros."""
    name = "arith.shru"
    fn = staticmethod(_shift_right_logical)


class ScalarCast(OpDef):
    """mlc.cast on one value; the result type is the target."""
    name = "arith.cast"
    operands = 1
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        _scalar(op.operand_types[0], "operand 0")
        if not op.results:
            raise VerifyError("needs its result type")
        return [_scalar(op.results[0].type, "result")]

    @staticmethod
    def interpret(ins, op, ctx):
        return mlc.Cast.convert(np.asarray(ins[0]), op.results[0].type)


# ---------------------------------------------------------------------------------------------------
# vector: short vectors in registers

def _vector(t, what) -> VectorType:
    if not isinstance(t, VectorType) or t.rank != 1 or not t.is_static:
        raise VerifyError(f"{what} must be a vector like vector<8xf32>, got {t}")
    return t


def _lanes(buffer: np.ndarray, idx: tuple, n: int):
    """The index expression of n elements along the last dim from idx, checked like mem.load."""
    _checked(buffer, idx)
    if idx[-1] + n > buffer.shape[-1]:
        raise RuntimeCheck(f"{n} lanes from index {idx[-1]} run past dim {len(idx) - 1} of a buffer of shape {fmt_shape(buffer.shape)}")
    return idx[:-1] + (slice(idx[-1], idx[-1] + n),)


def _check_aligned(op, buffer: np.ndarray, start: int, n: int):
    """`aligned`: the access starts at a multiple of its size (16-byte GPU loads and stores need it)."""
    if op.attr("aligned") and start % n:
        raise RuntimeCheck(f"an aligned {n}-lane access starts at element {start} of a buffer of shape "
                           f"{fmt_shape(buffer.shape)}, not a multiple of {n}")


class VectorLoad(OpDef):
    """Consecutive elements along the last dim, starting at the indices; with `stride` s, every s-th
    of the lanes x s elements from there (all of which must lie in the buffer: they are read whole,
    then picked: a convolution's input along a row at stride 2). `aligned` promises that the first
    element's position in the buffer is a multiple of the vector's length."""
    name = "vector.load"
    operands = (2, None)
    traits = {READS}
    attrs = {"aligned": Attr("bool", False), "stride": Attr("int", 1)}

    @staticmethod
    def infer(op, ctx):
        t = _memref(op.operand_types[0])
        _indices(op.operand_types[1:], t.rank, 1)
        if not op.results:
            raise VerifyError("needs its result type, e.g. '-> vector<8xf32>'")
        v = _vector(op.results[0].type, "result")
        if v.element != t.element:
            raise VerifyError(f"loads {v} from a buffer of {t.element}")
        if op.attr("stride") < 1:
            raise VerifyError(f"stride must be at least 1, got {op.attr('stride')}")
        return [v]

    @staticmethod
    def interpret(ins, op, ctx):
        n, stride = op.results[0].type.shape[0], op.attr("stride")
        at = tuple(int(i) for i in ins[1:])
        _check_aligned(op, ins[0], int(np.ravel_multi_index(at, ins[0].shape)) if at else 0, n)
        return ins[0][_lanes(ins[0], at, n * stride)][::stride].copy()

    @staticmethod
    def interpret_lanes(ins, op, block):
        stride = op.attr("stride")
        return block.load(op, ins[0], ins[1:], lanes=op.results[0].type.shape[0] * stride)[::stride]


class VectorStore(OpDef):
    name = "vector.store"
    operands = (3, None)
    results = 0
    attrs = {"aligned": Attr("bool", False)}

    @staticmethod
    def infer(op, ctx):
        return _store_into(op, _vector(op.operand_types[0], "operand 0 (the value)"))

    @staticmethod
    def interpret(ins, op, ctx):
        at = tuple(int(i) for i in ins[2:])
        _check_aligned(op, ins[1], int(np.ravel_multi_index(at, ins[1].shape)) if at else 0, len(ins[0]))
        ins[1][_lanes(ins[1], at, len(ins[0]))] = ins[0]
        return []

    @staticmethod
    def interpret_lanes(ins, op, block):
        block.store(op, ins[0], ins[1], ins[2:], lanes=op.operand_types[0].shape[0])
        return []


class Broadcast(OpDef):
    """A scalar in every lane."""
    name = "vector.broadcast"
    operands = 1
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        e = _scalar(op.operand_types[0], "operand 0")
        if not op.results:
            raise VerifyError("needs its result type, e.g. '-> vector<8xf32>'")
        v = _vector(op.results[0].type, "result")
        if v.element != e:
            raise VerifyError(f"broadcasts {e} to {v}")
        return [v]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.full(op.results[0].type.shape, ins[0], op.results[0].type.element.np_dtype)

    @staticmethod
    def interpret_lanes(ins, op, block):
        return ins[0]  # (threads,) broadcasts to (lanes, threads)


class FusedMultiplyAdd(OpDef):
    """a * b + c, rounded once (the CPU's FMA instruction)."""
    name = "vector.fma"
    operands = 3
    traits = {PURE, ELEMENTWISE}

    @staticmethod
    def infer(op, ctx):
        a, b, c = op.operand_types
        _vector(a, "operand 0")
        if not a == b == c or not a.element.is_float:
            raise VerifyError(f"operands must be one floating-point vector type, got {a}, {b}, {c}")
        return [a]

    @staticmethod
    def interpret(ins, op, ctx):
        a, b, c = (np.asarray(x, np.float64) for x in ins)
        return (a * b + c).astype(ins[0].dtype)


class FromElements(OpDef):
    """A vector of its operands, in order (a GPU thread's fragment, say)."""
    name = "vector.from_elements"
    operands = (1, None)
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        if not op.results:
            raise VerifyError("needs its result type, e.g. '-> vector<4xf32>'")
        v = _vector(op.results[0].type, "result")
        if v.shape[0] != len(op.operands) or any(t != v.element for t in op.operand_types):
            raise VerifyError(f"makes a {v} of {v.shape[0]} {v.element} scalars, got ({', '.join(map(str, op.operand_types))})")
        return [v]

    @staticmethod
    def interpret(ins, op, ctx):
        return np.array(ins, op.results[0].type.element.np_dtype)

    @staticmethod
    def interpret_lanes(ins, op, block):
        return np.stack([np.broadcast_to(x, (block.size,)) for x in ins])


class Extract(OpDef):
    """One lane of a vector."""
    name = "vector.extract"
    operands = 1
    traits = {PURE}
    attrs = {"position": Attr("int", required=True)}

    @staticmethod
    def infer(op, ctx):
        v = _vector(op.operand_types[0], "operand 0")
        if not 0 <= op.attr("position") < v.shape[0]:
            raise VerifyError(f"position {op.attr('position')} is outside a {v}")
        return [v.element]

    @staticmethod
    def interpret(ins, op, ctx):
        return ins[0][op.attr("position")]

    interpret_lanes = interpret


class ReduceAdd(OpDef):
    """The sum of a vector's lanes, in any order (LLVM's reassociating vector reduction: a shuffle tree)."""
    name = "vector.reduce_add"
    operands = 1
    traits = {PURE}

    @staticmethod
    def infer(op, ctx):
        return [_vector(op.operand_types[0], "operand 0").element]

    @staticmethod
    def interpret(ins, op, ctx):
        return ins[0].sum(dtype=ins[0].dtype)
