"""mlc.onnx: ONNX models as mlc modules, to run, compile and fine-tune.

    m = mlc.onnx.load("model.onnx")        # a path, bytes or an onnx.ModelProto -> a verified Module
    mlc.compile(m)["main"](x)

The graph becomes `@main`: its inputs that are not initializers are the arguments, in order, and its
outputs the results. Initializers become mlc.globals (floating-point ones trainable), read where a
node uses them as a tensor, and constants where it needs their value (a Reshape's shape). A node
whose inputs are all known is evaluated at import (onnx's reference implementation), so shape
subgraphs fold away when the shapes are known. Every other node goes through the converter registered
for its op type (`@converts`), which builds mlc ops with the opset of the node's domain; each op is
located at `model.onnx:<node name>`. A node no converter takes raises NotImplementedError naming its
op type, domain, opset and name. Needs the `onnx` package (the `onnx` extra).
"""
from __future__ import annotations

import os
import re

import numpy as np

from mlc.ir.attributes import BoolAttr, DenseAttr, StringAttr, SymbolRefAttr, TypeAttr
from mlc.ir.core import Builder, FuncOp, Module, Value, create_op
from mlc.ir.diagnostics import Location, error
from mlc.ir.registry import VerifyError
from mlc.ir.types import FunctionType, TensorType, element_of, f32, f64, int_range, round_to_element
from mlc.ir.verifier import verify
from mlc.passes.builder import OpBuilder

CONVERTERS: dict = {}


def converts(*op_types):
    """Registers fn(graph, node, inputs: list[str], attrs: dict) -> list of output Values."""
    def register(fn):
        for t in op_types:
            CONVERTERS[t] = fn
        return fn
    return register


class NeedsInput(NotImplementedError):
    """A converter needs the value of graph input `name` at import (a reduction's axes given as an
    input): load the model again with that input in `static`."""

    def __init__(self, message: str, name: str):
        super().__init__(message)
        self.name = name


def load(model, name: str | None = None, loss: str | None = None, static: dict | None = None) -> Module:
    """A verified Module from an ONNX model: a path, its bytes or an onnx.ModelProto. With `loss`
    ("cross_entropy" or "mse"), also `@loss(inputs..., %target)` on @main's first output, so that the
    model can be fine-tuned (`mlc train`, `mlc.compile_train_step`). `static` fixes the values of
    some inputs at import, as jax.jit's static arguments: they become constants (an input that sets a
    shape, such as a Reshape's target, must be static) and @main takes the other inputs in order."""
    import onnx
    where = name or (str(model) if isinstance(model, (str, os.PathLike)) else "model.onnx")
    try:
        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(str(model))
        elif isinstance(model, bytes):
            model = onnx.load_from_string(model)
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise error(Location(where, 0, 0), "no such file") from None
    except Exception as e:  # onnx's checker and parser raise their own types
        raise error(Location(where, 0, 0), f"not a valid ONNX model: {str(e).splitlines()[0]}") from None
    graph = Graph(model, where, static or {})
    if loss is not None:
        graph.add_loss(loss)
    return verify(graph.module)


def _name(text: str) -> str:
    """An IR value or symbol name from an ONNX name."""
    clean = re.sub(r"[^A-Za-z0-9_$.\-]", "_", text)
    return clean if clean and not clean[0].isdigit() else "v" + clean


def _element(elem_type: int):
    import onnx
    try:
        return element_of(np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)))
    except (KeyError, ValueError, TypeError):
        raise NotImplementedError(f"ONNX element type {onnx.TensorProto.DataType.Name(elem_type)} is not supported") from None


def _tensor_type(value_info) -> TensorType:
    t = value_info.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return TensorType(dims, _element(t.elem_type))


class Graph:
    """One import: the module being built, the IR value (or the known value) of each ONNX name."""

    def __init__(self, model, where: str, static: dict):
        import onnx
        from onnx import numpy_helper
        self.where = where
        self.opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        self.module = Module(_name(model.graph.name or "model"))
        graph = model.graph
        self.known: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
        self.values: dict[str, Value] = {}
        self.initializers = set(self.known)
        self.used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}  # names something reads
        inputs = [i for i in graph.input if i.name not in self.initializers]
        self.sources = {i.name: {i.name} for i in inputs}  # the graph inputs each run-time value is computed from
        self.partial: dict[str, np.ndarray] = {}  # run-time shapes known in part: object arrays, None where not
        declared = {i.name: i for i in inputs}
        for key, value in static.items():
            if key not in declared:
                raise ValueError(f"static input '{key}' is not an input of the model (its inputs: {', '.join(declared)})")
            self.known[key] = np.asarray(value, _tensor_type(declared[key]).element.np_dtype)
        inputs = [i for i in inputs if i.name not in static]
        arg_types = [_tensor_type(i) for i in inputs]
        self.func = FuncOp.build("main", arg_types, [], [_name(i.name) for i in inputs], loc=Location(where, 0, 0))
        self.module.body.append(self.func)
        self.values.update(zip((i.name for i in inputs), self.func.args))
        self.b = Builder.at_end(self.func.body, self.module, Location(where, 0, 0))
        self.d = OpBuilder(self.b)
        self.onnx = onnx
        for node in graph.node:
            self.node(node)
        results = [self.tensor(o.name) for o in graph.output]
        self.b.loc = Location(where, 0, 0)
        self.b.create("func.return", results)
        self.func.attributes["function_type"] = TypeAttr(FunctionType(tuple(arg_types), tuple(v.type for v in results)))

    def add_loss(self, kind: str):
        """@loss(inputs..., %target): `kind` of @main's first output against the target."""
        if kind not in ("cross_entropy", "mse"):
            raise ValueError(f"loss must be 'cross_entropy' or 'mse', got {kind!r}")
        main = self.func.type
        y = main.results[0]
        target = TensorType(y.shape[:1], element_of(np.dtype(np.int64))) if kind == "cross_entropy" else y
        f32 = TensorType((), y.element)
        fn = FuncOp.build("loss", list(main.inputs) + [target], [f32], [a.name_hint for a in self.func.args] + ["target"],
                          loc=Location(self.where, 0, 0))
        self.module.body.append(fn)
        d = OpBuilder(Builder.at_end(fn.body, self.module, Location(self.where, 0, 0)))
        out = d.op("func.call", list(fn.args[:-1]), list(main.results), callee=SymbolRefAttr("main")).results[0]
        if kind == "cross_entropy":
            value = d("mlc.cross_entropy", out, fn.args[-1], result_type=f32)
        else:
            diff = d("mlc.sub", out, fn.args[-1])
            value = d("mlc.reduce_mean", d("mlc.mul", diff, diff), axes=list(range(y.rank)), keepdims=False)
        d.b.create("func.return", [value])

    # --- values ---------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> Value:
        """The IR value of an ONNX name: an argument, a node's result, a global (an initializer) or a
        constant (a value known at import)."""
        if name in self.values:
            return self.values[name]
        if name in self.initializers:
            t = TensorType(self.known[name].shape, element_of(self.known[name].dtype))
            array = round_to_element(self.known[name], t.element)  # (bf16 is held in float32)
            symbol = _name(name)
            decl = create_op("mlc.global", attributes={"sym_name": StringAttr(symbol), "type": TypeAttr(t), "init": DenseAttr(array, t),
                                                       **({"trainable": BoolAttr(True)} if t.element.is_float else {})},
                             loc=Location(self.where, 0, 0))
            self.module.body.insert_before(self.func, decl)
            top = Builder(self.func.body, self.func.body.first, self.module)
            value = top.create("mlc.global_load", [], {"global": SymbolRefAttr(symbol)}, [t], name_hint=symbol).result
        elif name in self.known:
            array = np.array(self.known[name], order="C")  # (ascontiguousarray makes 0-d arrays 1-d)
            if array.size > 1024 and np.all(array == array.reshape(-1)[0]):  # a splat (ConstantOfShape): not its bytes
                t = TensorType(array.shape, element_of(array.dtype))
                value = self.d("mlc.broadcast_to", self.d.const(np.array(array.reshape(-1)[0])), result_type=t)
            else:
                value = self.d.const(array)
        else:
            raise KeyError(name)
        self.values[name] = value
        return value

    def const(self, name: str, node, what: str) -> np.ndarray:
        """A value the converter needs at import (a shape, axes)."""
        if name in self.known:
            return self.known[name]
        message = f"{node.op_type} node '{node.name}': its {what} ('{name}') must be known at import"
        inputs = sorted(self.sources.get(name, ()))
        if inputs:  # known once those inputs are
            raise NeedsInput(message + f" (load the model with static={{'{inputs[0]}': ...}})", inputs[0])
        raise NotImplementedError(message)

    # --- nodes ----------------------------------------------------------------------------------------------
    def node(self, node):
        domain = node.domain or "ai.onnx"
        opset = self.opsets.get(domain, 0)
        where = Location(f"{self.where}:{node.name or node.op_type}", 0, 0)
        present = [i for i in node.input if i]
        if present and all(i in self.known for i in node.input if i) and domain == "ai.onnx" and node.op_type != "Constant":
            self.fold(node)
            return
        partial = self.shape_arithmetic(node) if domain == "ai.onnx" else None
        if partial is not None and None not in partial.ravel():  # all known after all: a constant
            dtype = _element(self.attrs(node)["to"]).np_dtype if node.op_type == "Cast" else np.int64
            self.known[node.output[0]] = np.array(partial.tolist(), dtype)
            return
        convert = CONVERTERS.get(node.op_type) if domain == "ai.onnx" else None
        if convert is None:
            raise NotImplementedError(f"ONNX op {node.op_type} (domain {domain}, opset {opset}) of node '{node.name}' cannot be imported yet")
        self.b.loc = where
        self.opset = opset
        try:
            outputs = convert(self, node, list(node.input), self.attrs(node))
        except VerifyError as e:  # what the node asks for, mlc's op does not express (yet)
            raise NotImplementedError(f"ONNX op {node.op_type} (opset {opset}) of node '{node.name}': {e}") from None
        sources = set().union(*(self.sources.get(i, ()) for i in node.input)) if node.op_type not in ("Shape", "Size") else set()
        if partial is not None:
            self.partial[node.output[0]] = partial
        for name, value in zip(node.output, outputs):
            if name and value is not None:
                self.sources[name] = sources
                if isinstance(value, np.ndarray):
                    self.known[name] = value
                else:
                    value.name_hint = _name(name)
                    self.values[name] = value

    def entries(self, name: str):
        """What is known at import of a (small integer) value: an object array, None where unknown."""
        if name in self.known:
            return np.array(self.known[name], dtype=object)
        return self.partial.get(name)

    def shape_arithmetic(self, node):
        """The entries of a shape computed at run time, as far as they are known at import (a Shape of
        tensor<?x?x32xf32> knows its 32; Gather, Concat, Slice, Unsqueeze... carry that on)."""
        rule = SHAPE_ARITHMETIC.get(node.op_type)
        if rule is None or not any(i in self.partial for i in node.input):
            return None
        entries = [self.entries(i) if i else None for i in node.input]
        if any(e is None for e in entries[:1]):
            return None
        try:
            out = rule(self.attrs(node), entries)
        except (TypeError, ValueError, IndexError):  # (an index not known at import, ...)
            return None
        return np.array(out, dtype=object)

    def attrs(self, node) -> dict:
        out = {}
        for a in node.attribute:
            v = self.onnx.helper.get_attribute_value(a)
            if isinstance(v, list) and v and isinstance(v[0], bytes):
                v = [x.decode() for x in v]
            out[a.name] = v.decode() if isinstance(v, bytes) else v
        return out

    def fold(self, node):
        """A node of known inputs, evaluated now by onnx's reference implementation."""
        from onnx.reference import ReferenceEvaluator
        helper = self.onnx.helper
        inputs = [i for i in node.input if i]
        graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(self.known[i].dtype),
                                                                                 self.known[i].shape) for i in inputs],
                                  [helper.make_tensor_value_info(o, 0, None) for o in node.output if o])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opsets.get("ai.onnx", 13))])
        results = ReferenceEvaluator(model).run(None, {i: self.known[i] for i in inputs})
        for name, value in zip([o for o in node.output if o], results):
            self.known[name] = np.asarray(value)


# --- converters ---------------------------------------------------------------------------------------------

UNARY = {"Abs": "abs", "Neg": "neg", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Relu": "relu", "Sigmoid": "sigmoid",
         "Tanh": "tanh", "Erf": "erf", "Floor": "floor", "Sin": "sin", "Cos": "cos", "Reciprocal": "reciprocal",
         "Sign": "sign", "Not": "not", "Tan": "tan", "Asin": "asin", "Acos": "acos", "Atan": "atan", "Sinh": "sinh",
         "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh", "Round": "round"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "Pow": "pow", "Equal": "eq", "Less": "lt",
          "Greater": "gt", "LessOrEqual": "le", "GreaterOrEqual": "ge", "And": "and", "Or": "or"}
VARIADIC = {"Sum": "add", "Max": "maximum", "Min": "minimum"}


@converts(*UNARY)
def _unary(g, node, ins, attrs):
    return [g.d("mlc." + UNARY[node.op_type], g.tensor(ins[0]))]


@converts(*BINARY)
def _binary(g, node, ins, attrs):
    a, b = g.tensor(ins[0]), g.tensor(ins[1])
    if node.op_type == "Pow" and b.type.element != a.type.element:  # an exponent of another type
        b = g.d("mlc.cast", b, result_type=b.type.with_element(a.type.element))
    if g.opset < 7:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': legacy broadcasting (opset {g.opset}) is not imported")
    if node.op_type == "Pow" and not a.type.element.is_float:  # integer powers: exact in f64 up to 2^53
        wide = [g.d("mlc.cast", v, result_type=v.type.with_element(f64)) for v in (a, b)]
        power = g.d("mlc.pow", *wide)
        return [g.d("mlc.cast", power, result_type=power.type.with_element(a.type.element))]
    return [g.d("mlc." + BINARY[node.op_type], a, b)]


@converts(*VARIADIC)
def _variadic(g, node, ins, attrs):
    out = g.tensor(ins[0])
    for name in ins[1:]:
        out = g.d("mlc." + VARIADIC[node.op_type], out, g.tensor(name))
    return [out]


@converts("Identity", "Dropout")
def _identity(g, node, ins, attrs):
    """(Dropout as inference runs it: the identity; its mask output and a training_mode of true are
    refused.)"""
    x = g.tensor(ins[0])
    if node.op_type != "Dropout":
        return [x]
    training = len(ins) > 2 and ins[2] and bool(g.const(ins[2], node, "training_mode"))
    ratio = float(g.const(ins[1], node, "ratio")) if len(ins) > 1 and ins[1] else attrs.get("ratio", 0.5)
    if training and ratio != 0:
        raise NotImplementedError(f"Dropout node '{node.name}': training mode (random masks) is not imported")
    if len(node.output) < 2 or node.output[1] not in g.used:
        return [x]
    if not x.type.is_static:
        raise NotImplementedError(f"Dropout node '{node.name}': the mask of a tensor of ? dims is not imported")
    return [x, np.ones(x.type.shape, bool)]


@converts("LRN")
def _lrn(g, node, ins, attrs):
    """x / (bias + alpha / size * the sum of squares over `size` neighbouring channels) ^ beta."""
    x = g.tensor(ins[0])
    channels, size = x.type.shape[1], attrs["size"]
    if channels is None:
        raise NotImplementedError(f"LRN node '{node.name}': the channel count must be known at import")
    low, rank = (size - 1) // 2, x.type.rank
    padded = g.d("mlc.pad", g.d("mlc.mul", x, x), low=[0, low] + [0] * (rank - 2), high=[0, size - 1 - low] + [0] * (rank - 2))
    window = None
    for k in range(size):
        part = g.d("mlc.slice", padded, start=[0, k] + [0] * (rank - 2), limit=[ALL, k + channels] + [ALL] * (rank - 2),
                   stride=[1] * rank)
        window = part if window is None else g.d("mlc.add", window, part)
    scale = g.d("mlc.add", g.d("mlc.mul", window, g.d.scalar(attrs.get("alpha", 1e-4) / size, x)), g.d.scalar(attrs.get("bias", 1.0), x))
    return [g.d("mlc.div", x, g.d("mlc.pow", scale, g.d.scalar(attrs.get("beta", 0.75), x)))]


@converts("Where")
def _where(g, node, ins, attrs):
    return [g.d("mlc.select", *(g.tensor(i) for i in ins))]


@converts("MatMul")
def _matmul(g, node, ins, attrs):
    return [g.d("mlc.matmul", g.tensor(ins[0]), g.tensor(ins[1]))]


@converts("Gemm")
def _gemm(g, node, ins, attrs):
    a, b = g.tensor(ins[0]), g.tensor(ins[1])
    a = g.d.swap_last(a) if attrs.get("transA") else a
    b = g.d.swap_last(b) if attrs.get("transB") else b
    y = g.d("mlc.matmul", a, b)
    if attrs.get("alpha", 1.0) != 1.0:
        y = g.d("mlc.mul", y, g.d.scalar(attrs["alpha"], y))
    if len(ins) > 2 and ins[2]:
        c = g.tensor(ins[2])
        if attrs.get("beta", 1.0) != 1.0:
            c = g.d("mlc.mul", c, g.d.scalar(attrs["beta"], c))
        y = g.d("mlc.add", y, c)
    return [y]


@converts("Softmax", "LogSoftmax")
def _softmax(g, node, ins, attrs):
    x = g.tensor(ins[0])
    name = "mlc.softmax" if node.op_type == "Softmax" else "mlc.log_softmax"
    if g.opset >= 13:
        return [g.d(name, x, axis=attrs.get("axis", -1))]
    axis = attrs.get("axis", 1) % max(x.type.rank, 1)  # before 13: over the dims from axis on, flattened
    if axis == x.type.rank - 1:
        return [g.d(name, x, axis=-1)]
    if not x.type.is_static:
        raise NotImplementedError(f"{node.op_type} node '{node.name}' (opset {g.opset}, axis {axis}) needs static shapes")
    rows = int(np.prod(x.type.shape[:axis]))
    flat = g.d.reshape(x, (rows, int(np.prod(x.type.shape[axis:]))))
    return [g.d.reshape(g.d(name, flat, axis=-1), x.type.shape)]


def _scalar(value: np.ndarray) -> float:
    """A one-element array's value (given as [v] or v)."""
    return float(np.ravel(value)[0])


def _reshaped(g, x: Value, entries) -> Value:
    """x reshaped; each entry of the new shape is a size (-1: what the others leave) or a range
    (first, last) of x's dims, the product of their sizes. With more than one `?` among the result's
    dims, the shape is also computed at run time (from mlc.shape_of x) for mlc.reshape to read."""
    def size(e):
        if isinstance(e, tuple):
            dims = x.type.shape[e[0]:e[1]]
            return None if None in dims else int(np.prod(dims, dtype=np.int64))
        return None if e == -1 else e
    dims = [size(e) for e in entries]
    if -1 in entries and dims.count(None) == 1 and x.type.is_static:
        dims[dims.index(None)] = int(np.prod(x.type.shape, dtype=np.int64)) // max(int(np.prod([d for d in dims if d is not None])), 1)
    t = x.type.with_shape(tuple(dims))
    if dims.count(None) <= 1:
        return g.d("mlc.reshape", x, result_type=t)
    d = g.d
    shape = d("mlc.shape_of", x)
    parts = []
    for e, n in zip(entries, dims):
        if not isinstance(e, tuple) or n is not None:
            parts.append(d.const(np.array([e if n is None else n], np.int64)))
        else:
            piece = d("mlc.slice", shape, start=[e[0]], limit=[e[1]], stride=[1])
            parts.append(piece if e[1] - e[0] == 1 else d.reshape(d("mlc.reduce_prod", piece, axes=[0], keepdims=False), (1,)))
    return d("mlc.reshape", x, d("mlc.concat", *parts, axis=0) if len(parts) > 1 else parts[0], result_type=t)


@converts("Reshape")
def _reshape(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if ins[1] not in g.known and ins[1] in g.partial:
        return [_reshape_at_run_time(g, node, x, g.partial[ins[1]], g.tensor(ins[1]), attrs)]
    shape = [int(v) for v in g.const(ins[1], node, "shape")]
    return [_reshaped(g, x, [(i, i + 1) if v == 0 and not attrs.get("allowzero", 0) else v for i, v in enumerate(shape)])]


def _reshape_at_run_time(g, node, x: Value, entries, shape: Value, attrs) -> Value:
    """A Reshape to a shape computed at run time: the result type has the entries known at import
    (a known 0 copies x's dim), `?` for the others, which mlc.reshape reads from the shape."""
    entries = list(entries.reshape(-1))
    copies = [i for i, v in enumerate(entries) if v == 0 and not attrs.get("allowzero", 0)]
    if any(i >= x.type.rank or x.type.shape[i] is None for i in copies):
        raise NotImplementedError(f"Reshape node '{node.name}': a 0 (copy) of a ? dim in a run-time shape is not imported")
    dims = [x.type.shape[i] if i in copies else None if v is None or v == -1 else int(v) for i, v in enumerate(entries)]
    if copies:  # the run-time shape with the copied sizes in place of the 0s
        mask = np.array([i in copies for i in range(len(entries))])
        shape = g.d("mlc.select", g.d.const(mask), g.d.const(np.array([d or 0 for d in dims], np.int64)), shape)
    return g.d("mlc.reshape", x, shape, result_type=x.type.with_shape(tuple(dims)))


@converts("Flatten")
def _flatten(g, node, ins, attrs):
    x = g.tensor(ins[0])
    axis = attrs.get("axis", 1)
    axis = axis + x.type.rank if axis < 0 else axis
    return [_reshaped(g, x, [(0, axis), (axis, x.type.rank)])]


@converts("Unsqueeze", "Squeeze")
def _squeeze(g, node, ins, attrs):
    x = g.tensor(ins[0])
    axes = attrs.get("axes") if g.opset < 13 else (list(g.const(ins[1], node, "axes")) if len(ins) > 1 and ins[1] else None)
    entries = [(i, i + 1) for i in range(x.type.rank)]
    if node.op_type == "Unsqueeze":
        rank = x.type.rank + len(axes)
        for a in sorted(int(a) % rank for a in axes):
            entries.insert(a, 1)
    else:
        axes = [int(a) % x.type.rank for a in axes] if axes is not None else [i for i, d in enumerate(x.type.shape) if d == 1]
        entries = [e for i, e in enumerate(entries) if i not in axes]
    return [_reshaped(g, x, entries)]


@converts("Transpose")
def _transpose(g, node, ins, attrs):
    x = g.tensor(ins[0])
    return [g.d("mlc.transpose", x, perm=list(attrs.get("perm", range(x.type.rank - 1, -1, -1))))]


@converts("Concat")
def _concat(g, node, ins, attrs):
    return [g.d("mlc.concat", *(g.tensor(i) for i in ins), axis=attrs["axis"])]


@converts("Cast")
def _cast(g, node, ins, attrs):
    return [_cast_to(g, g.tensor(ins[0]), _element(attrs["to"]), attrs.get("saturate", 1))]


def _cast_to(g, x: Value, element, saturate: bool) -> Value:
    """x as `element`; a saturating cast to an 8-bit float clamps to its largest finite value first
    (infinities too), the other kind makes what is out of range NaN (or infinity). A float out of
    the range of a signed 4- or 2-bit integer becomes 0, as onnx's reference makes it."""
    if element.name == "f8E8M0FNU":
        raise NotImplementedError("casts to FLOAT8E8M0 (rounding up, no zero) are not imported")
    if saturate and element.name.startswith("f8") and x.type.element.is_float:
        import ml_dtypes
        largest = float(ml_dtypes.finfo(element.np_dtype).max)
        x = g.d("mlc.clamp", x, min=-largest, max=largest)
    if element.name in ("i4", "i2") and x.type.element.is_float:
        low, high = int_range(element)
        inside = g.d("mlc.and", g.d("mlc.gt", x, g.d.scalar(low - 1, x)), g.d("mlc.lt", x, g.d.scalar(high + 1, x)))
        x = g.d("mlc.select", inside, x, g.d.scalar(0, x))
    return g.d("mlc.cast", x, result_type=x.type.with_element(element))


@converts("Clip")
def _clip(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if g.opset < 11:
        low, high = attrs.get("min"), attrs.get("max")
    else:
        low = _scalar(g.const(ins[1], node, "min")) if len(ins) > 1 and ins[1] else None
        high = _scalar(g.const(ins[2], node, "max")) if len(ins) > 2 and ins[2] else None
    bounds = {k: v for k, v in (("min", low), ("max", high)) if v is not None}
    return [g.d("mlc.clamp", x, **bounds) if bounds else x]


@converts("LeakyRelu")
def _leaky_relu(g, node, ins, attrs):
    x = g.tensor(ins[0])
    return [g.d("mlc.select", g.d("mlc.gt", x, g.d.scalar(0, x)), x, g.d("mlc.mul", x, g.d.scalar(attrs.get("alpha", 0.01), x)))]


@converts("Gelu")
def _gelu(g, node, ins, attrs):
    return [g.d("mlc.gelu", g.tensor(ins[0]), approximate=attrs.get("approximate", "none"))]


@converts("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd")
def _reduce(g, node, ins, attrs):
    x = g.tensor(ins[0])
    name = "mlc.reduce_" + node.op_type[len("Reduce"):].lower()
    if x.type.element.is_bool and node.op_type in ("ReduceMax", "ReduceMin"):  # any / all, as i8
        wide = _reduce_over(g, node, ins, attrs, g.d("mlc.cast", x, result_type=x.type.with_element(element_of(np.dtype(np.int8)))), name)
        return [g.d("mlc.gt", wide, g.d.scalar(0, wide))]  # (over nothing: i8's extremes, false for any, true for all)
    return [_reduce_over(g, node, ins, attrs, x, name)]


@converts("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(g, node, ins, attrs):
    x = g.tensor(ins[0])
    name = "mlc.reduce_mean" if node.op_type == "GlobalAveragePool" else "mlc.reduce_max"
    return [g.d(name, x, axes=list(range(2, x.type.rank)), keepdims=True)]


def _window_nd(g, node, attrs, x: Value, kernel=None) -> tuple:
    """(strides, begin pads, end pads, dilations, kernel) of a convolution or pool, a list each with an
    entry per spatial dim. auto_pad SAME_* pads so that the output has ceil(input / stride) elements
    (the odd one at the end for UPPER)."""
    spatial = x.type.rank - 2
    strides = list(attrs.get("strides", [1] * spatial))
    pads = list(attrs.get("pads", [0] * 2 * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    kernel = list(attrs.get("kernel_shape", kernel or []))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        sizes = x.type.shape[2:]
        if None in sizes or not kernel:
            raise NotImplementedError(f"{node.op_type} node '{node.name}': auto_pad {auto_pad} needs static sizes")
        totals = [max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0) for n, s, k, d in zip(sizes, strides, kernel, dilations)]
        first = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = first + [t - f for t, f in zip(totals, first)]
    elif auto_pad == "VALID":
        pads = [0] * 2 * spatial
    return strides, pads[:spatial], pads[spatial:], dilations, kernel


def _window(g, node, attrs, x: Value, kernel=None) -> tuple:
    """(strides, pads [top, left, bottom, right], dilations, kernel) of a 2-d convolution or pool; a 1-d
    one is the 2-d one over a height of 1 (x is then reshaped by the caller: see _as_2d)."""
    if x.type.rank not in (3, 4):
        raise NotImplementedError(f"{node.op_type} node '{node.name}': only 1-d and 2-d windows are imported")
    strides, begin, end, dilations, kernel = _window_nd(g, node, attrs, x, kernel)
    if x.type.rank == 3:
        return [1] + strides, [0, begin[0], 0, end[0]], [1] + dilations, [1] + kernel if kernel else kernel
    return strides, begin + end, dilations, kernel


def _as_2d(g, v: Value) -> Value:
    """[N, C, L] as [N, C, 1, L] (and a 1-d kernel [O, C, k] as [O, C, 1, k])."""
    return g.d.reshape(v, v.type.shape[:2] + (1,) + v.type.shape[2:]) if v.type.rank == 3 else v


def _back_to_1d(g, y: Value, rank: int) -> Value:
    return g.d.reshape(y, y.type.shape[:2] + y.type.shape[3:]) if rank == 3 else y


@converts("Conv")
def _conv(g, node, ins, attrs):
    x, w = g.tensor(ins[0]), g.tensor(ins[1])
    strides, pads, dilations, _ = _window(g, node, attrs, x, list(w.type.shape[2:]))
    y = g.d("mlc.conv2d", _as_2d(g, x), _as_2d(g, w), stride=strides, padding=pads, dilation=dilations, groups=attrs.get("group", 1))
    y = _back_to_1d(g, y, x.type.rank)
    if len(ins) > 2 and ins[2]:
        bias = g.tensor(ins[2])
        y = g.d("mlc.add", y, g.d.reshape(bias, (bias.type.shape[0],) + (1,) * (y.type.rank - 2)))
    return [y]


@converts("MaxPool", "AveragePool")
def _pool(g, node, ins, attrs):
    """mlc's 2-d pools where they express the window; otherwise (3-d windows, dilations, ceil_mode,
    padding over half the kernel) strided slices of the padded input."""
    x = g.tensor(ins[0])
    if len([o for o in node.output if o]) > 1:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': the indices output is not imported")
    strides, begin, end, dilations, kernel = _window_nd(g, node, attrs, x)
    ceil = [_ceil_extra(n, b, e, k, s, d) if attrs.get("ceil_mode", 0) and n is not None else 0
            for n, b, e, k, s, d in zip(x.type.shape[2:], begin, end, kernel, strides, dilations)]
    if x.type.rank in (3, 4) and set(dilations) == {1} and not any(ceil) and all(
            p <= k // 2 for p, k in zip(begin + end, kernel * 2)):
        strides, pads, _, kernel = _window(g, node, attrs, x)
        extra = {"count_include_pad": bool(attrs.get("count_include_pad", 0))} if node.op_type == "AveragePool" else {}
        name = "mlc.max_pool2d" if node.op_type == "MaxPool" else "mlc.avg_pool2d"
        return [_back_to_1d(g, g.d(name, _as_2d(g, x), kernel=kernel, stride=strides, padding=pads, **extra), x.type.rank)]
    return [_pool_by_slices(g, node, x, strides, begin, [e + c for e, c in zip(end, ceil)], dilations, kernel, end, attrs)]


def _ceil_extra(size: int, begin: int, end: int, k: int, stride: int, dilation: int) -> int:
    """The padding ceil_mode adds at the end: enough for one more window, if that window starts inside
    the input or its leading padding."""
    span, padded = dilation * (k - 1) + 1, size + begin + end
    count = -(-(padded - span) // stride) + 1
    if (count - 1) * stride >= size + begin:
        count -= 1  # (that window would start past the input)
    return max((count - 1) * stride + span - padded, 0)


def _pool_by_slices(g, node, x: Value, strides, begin, end, dilations, kernel, counted_end, attrs) -> Value:
    """The maximum, or sum, of one strided slice per kernel position of x padded by begin/end. The
    average divides by the counted cells of each window: the input's, and its padding's up to
    `counted_end` if count_include_pad (never the cells ceil_mode adds)."""
    import itertools
    if None in x.type.shape[1:]:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': this pool needs static sizes")
    d = g.d
    is_max = node.op_type == "MaxPool"
    e = x.type.element
    fill = (-np.inf if e.is_float else int_range(e)[0]) if is_max else 0.0
    padded = d("mlc.pad", x, low=[0, 0] + begin, high=[0, 0] + end, value=float(fill))
    sizes = padded.type.shape[2:]
    outs = [(n - dl * (k - 1) - 1) // s + 1 for n, k, s, dl in zip(sizes, kernel, strides, dilations)]
    y = None
    for offsets in itertools.product(*(range(k) for k in kernel)):
        start = [0, 0] + [i * dl for i, dl in zip(offsets, dilations)]
        limit = [x.type.shape[0] or ALL, x.type.shape[1]] + [b + (o - 1) * s + 1 for b, o, s in zip(start[2:], outs, strides)]
        part = d("mlc.slice", padded, start=start, limit=limit, stride=[1, 1] + strides)
        y = part if y is None else d("mlc.maximum" if is_max else "mlc.add", y, part)
    if is_max:
        return y
    include = 1.0 if attrs.get("count_include_pad", 0) else 0.0
    counts = np.ones(())
    for n, b, e_, c_end, o, s, dl, k in zip(x.type.shape[2:], begin, end, counted_end, outs, strides, dilations, kernel):
        cells = np.concatenate([np.full(b, include), np.ones(n), np.full(c_end, include), np.zeros(e_ - c_end)])
        counts = np.multiply.outer(counts, [cells[i * s: i * s + dl * (k - 1) + 1: dl].sum() for i in range(o)])
    return d("mlc.mul", y, d.const((1.0 / counts).astype(e.np_dtype)))


@converts("BatchNormalization")
def _batch_norm(g, node, ins, attrs):
    """Inference: with the running statistics. Training mode (opset 14 on): with the batch's, and the
    running ones updated by `momentum` as further outputs."""
    x, scale, bias, mean, var = (g.tensor(i) for i in ins[:5])
    d = g.d
    per_channel = (x.type.shape[1],) + (1,) * (x.type.rank - 2)
    scale, bias = (d.reshape(v, per_channel) for v in (scale, bias))
    if attrs.get("training_mode", 0):
        axes = [0] + list(range(2, x.type.rank))
        normal, batch_mean, batch_var, _ = _normalised(g, x, axes, attrs)
        momentum = attrs.get("momentum", 0.9)
        running = [d("mlc.add", d("mlc.mul", old, d.scalar(momentum, old)),
                     d("mlc.mul", d.reshape(new, old.type.shape), d.scalar(1 - momentum, old)))
                   for old, new in ((mean, batch_mean), (var, batch_var))]
        return [d("mlc.add", d("mlc.mul", normal, scale), bias), *running]
    if len([o for o in node.output if o]) > 1:
        raise NotImplementedError(f"BatchNormalization node '{node.name}': the statistics outputs of inference mode are not imported")
    mean, var = (d.reshape(v, per_channel) for v in (mean, var))
    inv = d("mlc.rsqrt", d("mlc.add", var, d.scalar(attrs.get("epsilon", 1e-5), var)))
    return [d("mlc.add", d("mlc.mul", d("mlc.mul", d("mlc.sub", x, mean), inv), scale), bias)]


@converts("Gather")
def _gather(g, node, ins, attrs):
    x, index = g.tensor(ins[0]), g.tensor(ins[1])
    axis = attrs.get("axis", 0) % x.type.rank
    if x.type.shape[axis] is not None:  # negative indices count from the end
        size = g.d.scalar(x.type.shape[axis], index)
        index = g.d("mlc.select", g.d("mlc.lt", index, g.d.scalar(0, index)), g.d("mlc.add", index, size), index)
    return [g.d("mlc.gather", x, index, axis=axis)]


@converts("GatherElements")
def _gather_elements(g, node, ins, attrs):
    return [g.d("mlc.gather_elements", g.tensor(ins[0]), g.tensor(ins[1]), axis=attrs.get("axis", 0))]


@converts("TopK")
def _topk(g, node, ins, attrs):
    x = g.tensor(ins[0])
    k = attrs["k"] if g.opset < 10 else int(np.ravel(g.const(ins[1], node, "k"))[0])
    axis = attrs.get("axis", -1) % x.type.rank
    values = x.type.with_shape(tuple(k if a == axis else n for a, n in enumerate(x.type.shape)))
    op = g.d.op("mlc.topk", [x], [values, values.with_element(element_of(np.dtype(np.int64)))], k=k, axis=axis,
                largest=bool(attrs.get("largest", 1)), sorted=bool(attrs.get("sorted", 1)))
    return list(op.results)


@converts("Constant")
def _constant(g, node, ins, attrs):
    from onnx import numpy_helper
    if "value" in attrs:
        return [numpy_helper.to_array(attrs["value"])]
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return [np.array(attrs[key], dtype)]
    raise NotImplementedError(f"Constant node '{node.name}': only tensor, float and int values are imported")


@converts("Shape")
def _shape(g, node, ins, attrs):
    """Known at import when x's shape is static; otherwise mlc.shape_of, its known dims noted (the
    shape arithmetic that follows carries them on, see Graph.shape_arithmetic)."""
    x = g.tensor(ins[0])
    start, end = attrs.get("start", 0), attrs.get("end", None)
    if x.type.is_static:
        return [np.array(x.type.shape[start:end], np.int64)]
    shape = g.d("mlc.shape_of", x)
    first, last, _ = slice(start, end).indices(x.type.rank)
    if (first, last) != (0, x.type.rank):
        shape = g.d("mlc.slice", shape, start=[first], limit=[max(last, first)], stride=[1])
    g.partial[node.output[0]] = np.array(x.type.shape[first:last], dtype=object)
    return [shape]


def _elementwise(fn):
    """fn over object arrays, None where an operand is."""
    def apply(*arrays):
        return np.array(np.frompyfunc(lambda *v: None if None in v else fn(*v), len(arrays), 1)(*arrays), dtype=object)
    return apply


def _slice_entries(e):
    """A 1-d Slice (opset 10 on) of known starts, ends (and steps)."""
    if e[0].ndim != 1 or len(e) > 3 and e[3] is not None and int(e[3][0]) not in (0, -1):
        raise ValueError("not a slice of a 1-d shape")
    return e[0][slice(int(e[1][0]), int(e[2][0]), int(e[4][0]) if len(e) > 4 and e[4] is not None else 1)]


def _axes_of(attrs, entries):
    axes = attrs.get("axes") if len(entries) < 2 or entries[1] is None else entries[1].tolist()
    if axes is None or None in axes:
        raise ValueError("axes not known")
    return [int(a) for a in axes]


SHAPE_ARITHMETIC = {  # op: fn(attrs, entries of its inputs) -> entries of its output (None unknown)
    "Identity": lambda a, e: e[0], "Cast": lambda a, e: e[0],
    "Gather": lambda a, e: np.take(e[0], np.array(e[1].tolist(), np.int64), axis=a.get("axis", 0)),
    "Concat": lambda a, e: np.concatenate(e, axis=a["axis"]),
    "Unsqueeze": lambda a, e: np.expand_dims(e[0], tuple(ax % (e[0].ndim + len(_axes_of(a, e))) for ax in _axes_of(a, e))),
    "Squeeze": lambda a, e: np.squeeze(e[0], tuple(_axes_of(a, e))) if _axes_of(a, e) else e[0].reshape(-1)[:1].reshape(()),
    "Slice": lambda a, e: _slice_entries(e),
    "Add": lambda a, e: _elementwise(lambda x, y: x + y)(*e), "Sub": lambda a, e: _elementwise(lambda x, y: x - y)(*e),
    "Mul": lambda a, e: _elementwise(lambda x, y: x * y)(*e),
    "Div": lambda a, e: _elementwise(lambda x, y: int(x / y) if isinstance(x, (int, np.integer)) else x / y)(*e),
}


@converts("CastLike")
def _cast_like(g, node, ins, attrs):
    like = g.tensor(ins[1]).type.element
    if ins[0] in g.known:  # (a constant made like a run-time value: still known)
        import ml_dtypes
        return [g.known[ins[0]].astype(ml_dtypes.bfloat16 if like.name == "bf16" else like.np_dtype)]
    return [_cast_to(g, g.tensor(ins[0]), like, attrs.get("saturate", 1))]


@converts("Ceil")
def _ceil(g, node, ins, attrs):
    x = g.tensor(ins[0])
    return [g.d("mlc.neg", g.d("mlc.floor", g.d("mlc.neg", x)))]


@converts("Xor")
def _xor(g, node, ins, attrs):
    return [g.d("mlc.ne", g.tensor(ins[0]), g.tensor(ins[1]))]


@converts("Mean")
def _mean(g, node, ins, attrs):
    total = g.tensor(ins[0])
    for name in ins[1:]:
        total = g.d("mlc.add", total, g.tensor(name))
    return [g.d("mlc.div", total, g.d.scalar(len(ins), total))]


# activations, as the ONNX operators define them
ACTIVATIONS = {
    "Elu": lambda g, x, a: g.d("mlc.select", g.d("mlc.gt", x, g.d.scalar(0, x)), x,
                               g.d("mlc.mul", g.d.scalar(a.get("alpha", 1.0), x), g.d("mlc.sub", g.d("mlc.exp", x), g.d.scalar(1, x)))),
    "Selu": lambda g, x, a: g.d("mlc.mul", g.d.scalar(a.get("gamma", 1.05070102214813232421875), x), g.d(
        "mlc.select", g.d("mlc.gt", x, g.d.scalar(0, x)), x,
        g.d("mlc.mul", g.d.scalar(a.get("alpha", 1.67326319217681884765625), x), g.d("mlc.sub", g.d("mlc.exp", x), g.d.scalar(1, x))))),
    "Softplus": lambda g, x, a: g.d("mlc.log1p", g.d("mlc.exp", x)),
    "Softsign": lambda g, x, a: g.d("mlc.div", x, g.d("mlc.add", g.d("mlc.abs", x), g.d.scalar(1, x))),
    "HardSigmoid": lambda g, x, a: g.d("mlc.clamp", g.d("mlc.add", g.d("mlc.mul", x, g.d.scalar(a.get("alpha", 0.2), x)),
                                                        g.d.scalar(a.get("beta", 0.5), x)), min=0.0, max=1.0),
    "HardSwish": lambda g, x, a: g.d("mlc.mul", x, g.d("mlc.clamp", g.d("mlc.add", g.d("mlc.mul", x, g.d.scalar(1 / 6, x)),
                                                                        g.d.scalar(0.5, x)), min=0.0, max=1.0)),
    "ThresholdedRelu": lambda g, x, a: g.d("mlc.select", g.d("mlc.gt", x, g.d.scalar(a.get("alpha", 1.0), x)), x, g.d.scalar(0, x)),
    "Shrink": lambda g, x, a: g.d("mlc.select", g.d("mlc.gt", x, g.d.scalar(a.get("lambd", 0.5), x)),
                                  g.d("mlc.sub", x, g.d.scalar(a.get("bias", 0.0), x)),
                                  g.d("mlc.select", g.d("mlc.lt", x, g.d.scalar(-a.get("lambd", 0.5), x)),
                                      g.d("mlc.add", x, g.d.scalar(a.get("bias", 0.0), x)), g.d.scalar(0, x))),
    "Mish": lambda g, x, a: g.d("mlc.mul", x, g.d("mlc.tanh", g.d("mlc.log1p", g.d("mlc.exp", x)))),
    "Swish": lambda g, x, a: g.d("mlc.mul", x, g.d("mlc.sigmoid", g.d("mlc.mul", x, g.d.scalar(a.get("alpha", 1.0), x)))),
    "Celu": lambda g, x, a: g.d("mlc.add", g.d("mlc.relu", x), g.d("mlc.minimum", g.d.scalar(0, x), g.d(
        "mlc.mul", g.d.scalar(a.get("alpha", 1.0), x), g.d("mlc.sub", g.d("mlc.exp", g.d("mlc.div", x, g.d.scalar(a.get("alpha", 1.0), x))),
                                                         g.d.scalar(1, x))))),
}


@converts(*ACTIVATIONS)
def _activation(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if not x.type.element.is_float:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': only floating-point inputs are imported")
    if x.type.element.bits < 32:  # computed in f32 and rounded once, as one op would be
        wide = g.d("mlc.cast", x, result_type=x.type.with_element(f32))
        return [g.d("mlc.cast", ACTIVATIONS[node.op_type](g, wide, attrs), result_type=x.type)]
    return [ACTIVATIONS[node.op_type](g, x, attrs)]


@converts("IsNaN", "IsInf")
def _is_special(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if node.op_type == "IsNaN":
        return [g.d("mlc.ne", x, x)]
    positive = g.d("mlc.eq", x, g.d.scalar(np.inf, x))
    negative = g.d("mlc.eq", x, g.d.scalar(-np.inf, x))
    detect = (attrs.get("detect_positive", 1), attrs.get("detect_negative", 1))
    parts = [p for p, on in zip((positive, negative), detect) if on]
    if not parts:  # (detects nothing: all false)
        return [g.d("mlc.and", positive, negative)]
    return [parts[0] if len(parts) == 1 else g.d("mlc.or", *parts)]


@converts("PRelu")
def _prelu(g, node, ins, attrs):
    x, slope = g.tensor(ins[0]), g.tensor(ins[1])
    return [g.d("mlc.select", g.d("mlc.lt", x, g.d.scalar(0, x)), g.d("mlc.mul", x, slope), x)]


@converts("ArgMax", "ArgMin")
def _arg(g, node, ins, attrs):
    x = g.tensor(ins[0])
    axis = attrs.get("axis", 0) % x.type.rank
    name = "mlc.argmax" if node.op_type == "ArgMax" else "mlc.argmin"
    if not attrs.get("select_last_index", 0):
        return [g.d(name, x, axes=[axis], keepdims=bool(attrs.get("keepdims", 1)))]
    size = x.type.shape[axis]  # the last: the first of x reversed along the axis
    if size is None:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': select_last_index along a ? dim is not imported")
    reversed_x = g.d("mlc.gather", x, g.d.const(np.arange(size - 1, -1, -1, dtype=np.int64)), axis=axis)
    first = g.d(name, reversed_x, axes=[axis], keepdims=bool(attrs.get("keepdims", 1)))
    return [g.d("mlc.sub", g.d.scalar(size - 1, first), first)]


@converts("ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp")
def _reduce_composite(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if not x.type.element.is_float:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': only floating-point inputs are imported")
    inner = {"ReduceSumSquare": lambda v: g.d("mlc.mul", v, v), "ReduceL1": lambda v: g.d("mlc.abs", v),
             "ReduceL2": lambda v: g.d("mlc.mul", v, v), "ReduceLogSum": lambda v: v, "ReduceLogSumExp": lambda v: g.d("mlc.exp", v)}
    total = _reduce_over(g, node, ins, attrs, inner[node.op_type](x), "mlc.reduce_sum")
    outer = {"ReduceL2": "mlc.sqrt", "ReduceLogSum": "mlc.log", "ReduceLogSumExp": "mlc.log"}.get(node.op_type)
    return [g.d(outer, total) if outer else total]


def _reduce_over(g, node, ins, attrs, x: Value, name: str) -> Value:
    """`name` over a reduction node's axes (an attribute until they became an input: opset 13 for
    ReduceSum, 18 for the others)."""
    as_input = g.opset >= (13 if node.op_type == "ReduceSum" else 18)
    axes = (list(g.const(ins[1], node, "axes")) if len(ins) > 1 and ins[1] else None) if as_input else attrs.get("axes")
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(x.type.rank))
    axes, keepdims = [int(a) % x.type.rank for a in axes], bool(attrs.get("keepdims", 1))
    if any(x.type.shape[a] == 0 for a in axes) and x.type.is_static:  # over nothing: the reduction's identity
        shape = [1 if a in axes else n for a, n in enumerate(x.type.shape) if keepdims or a not in axes]
        e = x.type.element
        low, high = (-np.inf, np.inf) if e.is_float else int_range(e)
        identity = {"mlc.reduce_sum": 0, "mlc.reduce_prod": 1, "mlc.reduce_max": low, "mlc.reduce_min": high}.get(name, np.nan)
        return g.d.const(np.full(shape, identity, e.np_dtype))
    return g.d(name, x, axes=axes, keepdims=keepdims)


@converts("LayerNormalization")
def _layer_norm(g, node, ins, attrs):
    """Y, and the optional Mean and InvStdDev over the normalised dims (kept as 1s)."""
    x, scale = g.tensor(ins[0]), g.tensor(ins[1])
    normal, mean, _, inverse = _normalised(g, x, list(range(attrs.get("axis", -1) % x.type.rank, x.type.rank)), attrs)
    y = g.d("mlc.mul", normal, scale)
    return [g.d("mlc.add", y, g.tensor(ins[2])) if len(ins) > 2 and ins[2] else y, mean, inverse]


def _normalised(g, x: Value, axes: list, attrs) -> tuple:
    """((x - mean) * inverse, mean, variance, inverse) with the mean, the variance and inverse =
    1 / sqrt(variance + epsilon) over `axes` (kept as 1s)."""
    mean = g.d("mlc.reduce_mean", x, axes=axes, keepdims=True)
    centred = g.d("mlc.sub", x, mean)
    var = g.d("mlc.reduce_mean", g.d("mlc.mul", centred, centred), axes=axes, keepdims=True)
    inverse = g.d("mlc.rsqrt", g.d("mlc.add", var, g.d.scalar(attrs.get("epsilon", 1e-5), var)))
    return g.d("mlc.mul", centred, inverse), mean, var, inverse


@converts("Slice")
def _slice(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if g.opset < 10:
        starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs.get("axes"), None
    else:
        starts, ends = g.const(ins[1], node, "starts"), g.const(ins[2], node, "ends")
        axes = g.const(ins[3], node, "axes") if len(ins) > 3 and ins[3] else None
        steps = g.const(ins[4], node, "steps") if len(ins) > 4 and ins[4] else None
    rank = x.type.rank
    start, limit, stride = [0] * rank, [None] * rank, [1] * rank
    for k, axis in enumerate(axes if axes is not None else range(len(starts))):
        axis = int(axis) % rank
        step = int(steps[k]) if steps is not None else 1
        if x.type.shape[axis] is None:
            raise NotImplementedError(f"Slice node '{node.name}': slices of ? dims are not imported")
        size = x.type.shape[axis]
        if step < 0:  # backwards: a gather of those indices
            first, last = (int(v) + size if v < 0 else int(v) for v in (starts[k], ends[k]))
            x = _take(g, x, axis, np.arange(min(max(first, 0), size - 1), min(max(last, -1), size - 1), step))
            continue
        clamp = lambda v: int(min(max(v + size if v < 0 else v, 0), size))  # noqa: E731
        start[axis], limit[axis], stride[axis] = clamp(int(starts[k])), clamp(int(ends[k])), step
    limit = [x.type.shape[i] if v is None else v for i, v in enumerate(limit)]
    if None in limit:
        raise NotImplementedError(f"Slice node '{node.name}': slices of ? dims are not imported")
    return [g.d("mlc.slice", x, start=start, limit=[max(lv, s) for lv, s in zip(limit, start)], stride=stride)]


@converts("Split")
def _split(g, node, ins, attrs):
    x = g.tensor(ins[0])
    axis = attrs.get("axis", 0) % x.type.rank
    size = x.type.shape[axis]
    parts = attrs.get("split") if g.opset < 13 else (list(g.const(ins[1], node, "split")) if len(ins) > 1 and ins[1] else None)
    count = len([o for o in node.output])
    if parts is None:
        if size is None:
            raise NotImplementedError(f"Split node '{node.name}': splitting a ? dim is not imported")
        chunk = -(-size // attrs.get("num_outputs", count))
        parts = [min(chunk, size - k * chunk) for k in range(count)]
    out, at = [], 0
    for p in parts:
        start, limit = [0] * x.type.rank, list(x.type.shape)
        if None in limit:
            raise NotImplementedError(f"Split node '{node.name}': splitting tensors with ? dims is not imported")
        start[axis], limit[axis] = at, at + int(p)
        out.append(g.d("mlc.slice", x, start=start, limit=limit, stride=[1] * x.type.rank))
        at += int(p)
    return out


@converts("Pad")
def _pad(g, node, ins, attrs):
    """constant: mlc.pad (a negative pad crops first); edge, reflect and wrap: a gather of the
    source index of each position, per padded axis."""
    x = g.tensor(ins[0])
    mode = attrs.get("mode", "constant")
    pads = attrs.get("pads") if g.opset < 11 else list(g.const(ins[1], node, "pads"))
    value = attrs.get("value", 0.0) if g.opset < 11 else (_scalar(g.const(ins[2], node, "value")) if len(ins) > 2 and ins[2] else 0.0)
    rank = x.type.rank
    axes = list(range(rank)) if g.opset < 18 or len(ins) < 4 or not ins[3] else [int(a) % rank for a in g.const(ins[3], node, "axes")]
    low, high = [0] * rank, [0] * rank
    for k, a in enumerate(axes):
        low[a], high[a] = int(pads[k]), int(pads[k + len(axes)])
    if mode == "constant" and min(low + high) >= 0:
        return [g.d("mlc.pad", x, low=low, high=high, value=float(value))]
    for a in range(rank):
        n = x.type.shape[a]
        if (low[a] or high[a]) and n is None:
            raise NotImplementedError(f"Pad node '{node.name}': padding a ? dim is not imported")
        if mode == "constant" and min(low[a], high[a]) < 0:  # crop, then pad what is left to pad
            x = _take(g, x, a, np.arange(max(-low[a], 0), n + min(high[a], 0)))
            low[a], high[a] = max(low[a], 0), max(high[a], 0)
    if mode == "constant":
        return [g.d("mlc.pad", x, low=low, high=high, value=float(value))]
    for a in range(rank):
        if low[a] or high[a]:
            n = x.type.shape[a]
            i = np.arange(-low[a], n + high[a])
            if mode == "edge":
                i = np.clip(i, 0, n - 1)
            elif mode == "wrap":
                i = i % n
            elif mode == "reflect":
                period = max(2 * n - 2, 1)
                i = np.abs(i) % period
                i = np.where(i >= n, period - i, i)
            else:
                raise NotImplementedError(f"Pad node '{node.name}': mode {mode} is not imported")
            x = _take(g, x, a, i)
    return [x]


def _take(g, x: Value, axis: int, indices: np.ndarray) -> Value:
    """x's elements at the (known) indices along axis."""
    return g.d("mlc.gather", x, g.d.const(np.asarray(indices, np.int64)), axis=axis)


@converts("Expand")
def _expand(g, node, ins, attrs):
    x = g.tensor(ins[0])
    shape = [int(v) for v in g.const(ins[1], node, "shape")]
    rank = max(len(shape), x.type.rank)
    mine = [1] * (rank - x.type.rank) + list(x.type.shape)
    theirs = [1] * (rank - len(shape)) + shape
    target = [a if b == 1 else b for a, b in zip(mine, theirs)]
    if None in target:
        raise NotImplementedError(f"Expand node '{node.name}': expanding ? dims is not imported")
    return [g.d("mlc.broadcast_to", x, result_type=x.type.with_shape(tuple(target)))]


# --- onnx.backend ------------------------------------------------------------------------------------------

def __getattr__(name):
    """`mlc.onnx.backend`: an onnx.backend.base.Backend (made when first asked for: onnx is optional)."""
    if name == "backend":
        globals()["backend"] = _make_backend()
        return globals()["backend"]
    raise AttributeError(f"module 'mlc.onnx' has no attribute '{name}'")


def _make_backend():
    from onnx.backend.base import Backend, BackendRep

    class MlcRep(BackendRep):
        """A model prepared for mlc: compiled for the CPU (or a GPU), or run on the interpreter. An
        input whose value the import needs (a Reshape's shape given as an input) makes the model
        compiled per value of such inputs, when it is run."""

        def __init__(self, model, target: str):
            self.model, self.target = model, target
            initializers = {i.name for i in model.graph.initializer}
            self.input_names = [i.name for i in model.graph.input if i.name not in initializers]
            self.static: list[str] = []  # the inputs the import needs the values of
            self.specialised: dict = {}  # their values -> a run function
            try:
                self.specialise({})
            except NeedsInput as e:
                self.static.append(e.name)

        def specialise(self, inputs: dict):
            """The run function of the module imported with the static inputs' values in `inputs`."""
            while True:
                key = tuple((n, inputs[n].dtype.str, inputs[n].shape, inputs[n].tobytes()) for n in self.static)
                if key in self.specialised:
                    return self.specialised[key]
                try:
                    module = load(self.model, static={n: inputs[n] for n in self.static})
                except NeedsInput as e:
                    if e.name in self.static or e.name not in inputs:
                        raise
                    self.static.append(e.name)
                    continue
                if self.target == "interp":
                    from mlc.ir.interpreter import Interpreter
                    interp = Interpreter(module)
                    self.specialised[key] = lambda *arrays: interp.call_public("main", arrays)
                else:
                    from mlc.api import compile
                    self.specialised[key] = compile(module, self.target)["main"]

        def run(self, inputs, **kwargs):
            named = dict(inputs) if isinstance(inputs, dict) else dict(zip(self.input_names, inputs))
            named = {n: np.asarray(v) for n, v in named.items()}
            out = self.specialise(named)(*(named[n] for n in self.input_names if n not in self.static))
            return tuple(out) if isinstance(out, tuple) else (out,)

    class MlcBackend(Backend):
        """mlc as an ONNX backend: `target` is "cpu" (default), "interp" or "cuda"."""

        @classmethod
        def prepare(cls, model, device: str = "CPU", target: str | None = None, **kwargs):
            super().prepare(model, device, **kwargs)
            return MlcRep(model, target or ("cuda" if device.upper().startswith("CUDA") else "cpu"))

        @classmethod
        def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
            return cls.prepare(model, device, **kwargs).run(inputs)

        @classmethod
        def supports_device(cls, device: str) -> bool:
            return device.upper().split(":")[0] in ("CPU", "CUDA")

    return MlcBackend


@converts("ConvTranspose")
def _conv_transpose(g, node, ins, attrs):
    """With output_shape (or auto_pad SAME_*: the input times the stride), the pads are what makes
    that shape (the odd one at the end for SAME_UPPER, at the start otherwise), or output_padding
    where it is larger than the full output."""
    x, w = g.tensor(ins[0]), g.tensor(ins[1])
    kernel = list(w.type.shape[2:])
    strides, pads, dilations, _ = _window(g, node, {**attrs, "auto_pad": "NOTSET"}, x)
    output_padding = list(attrs.get("output_padding", [0] * (x.type.rank - 2)))
    wanted = list(attrs.get("output_shape", []))[-(x.type.rank - 2):] if "output_shape" in attrs else None
    if wanted is None and attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [None if n is None else n * s for n, s in zip(x.type.shape[2:], strides[-(x.type.rank - 2):])]
    if wanted is not None:
        if None in x.type.shape[2:] or None in wanted:
            raise NotImplementedError(f"ConvTranspose node '{node.name}': output_shape needs static sizes")
        totals = [s * (n - 1) + p + (k - 1) * d + 1 - want for n, s, p, k, d, want in zip(
            x.type.shape[2:], strides[-len(wanted):], output_padding, kernel, dilations[-len(wanted):], wanted)]
        output_padding = [p - min(t, 0) for p, t in zip(output_padding, totals)]  # (larger than the full output: grown at the end)
        totals = [max(t, 0) for t in totals]
        upper = attrs.get("auto_pad") == "SAME_UPPER"
        first = [t // 2 if upper else t - t // 2 for t in totals]
        pads = first + [t - f for t, f in zip(totals, first)]
        if len(wanted) == 1:
            pads = [0, pads[0], 0, pads[1]]
    if x.type.rank == 3:
        output_padding = [0] + output_padding
    y = g.d("mlc.conv2d_transpose", _as_2d(g, x), _as_2d(g, w), stride=strides, padding=pads, dilation=dilations,
            output_padding=output_padding, groups=attrs.get("group", 1))
    y = _back_to_1d(g, y, x.type.rank)
    if len(ins) > 2 and ins[2]:
        bias = g.tensor(ins[2])
        y = g.d("mlc.add", y, g.d.reshape(bias, (bias.type.shape[0],) + (1,) * (y.type.rank - 2)))
    return [y]


@converts("InstanceNormalization")
def _instance_norm(g, node, ins, attrs):
    x, scale, bias = (g.tensor(i) for i in ins[:3])
    normal = _normalised(g, x, list(range(2, x.type.rank)), attrs)[0]
    per_channel = (x.type.shape[1],) + (1,) * (x.type.rank - 2)
    return [g.d("mlc.add", g.d("mlc.mul", normal, g.d.reshape(scale, per_channel)), g.d.reshape(bias, per_channel))]


@converts("Resize", "Upsample")
def _resize(g, node, ins, attrs):
    """Nearest, linear or cubic resizing, one product per resized axis with the interpolation matrix
    of resize.resize_plan (exact for nearest: one 1 per row); tf_crop_and_resize's points outside the
    input then take extrapolation_value."""
    from .resize import resize_plan
    x = g.tensor(ins[0])
    if not x.type.is_static or not x.type.element.is_float:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': resizing needs a float tensor of static shape")
    given = lambda k, what: g.const(ins[k], node, what) if len(ins) > k and ins[k] else None  # noqa: E731
    if node.op_type == "Upsample" or g.opset < 11:
        roi, scales, sizes = None, given(1, "scales") if len(ins) > 1 else np.array(attrs.get("scales")), None
    else:
        roi, scales, sizes = given(1, "roi"), given(2, "scales"), given(3, "sizes")
    try:
        plan = resize_plan(x.type.shape, attrs, roi, scales, sizes, 10 if node.op_type == "Upsample" else g.opset)
    except ValueError as e:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': {e}") from None
    d, rank = g.d, x.type.rank
    for axis, matrix, outside in plan:
        last = [k for k in range(rank) if k != axis] + [axis]  # the axis moved last: x @ M^T
        moved = d("mlc.transpose", x, perm=last) if axis != rank - 1 else x
        y = d("mlc.matmul", moved, d.const(matrix.T.astype(x.type.element.np_dtype)))
        if outside.any():
            y = d("mlc.add", y, d.const((outside * attrs.get("extrapolation_value", 0.0)).astype(x.type.element.np_dtype)))
        x = d("mlc.transpose", y, perm=[last.index(k) for k in range(rank)]) if axis != rank - 1 else y
    return [x]


@converts("Range")
def _range(g, node, ins, attrs):
    """Known at import (its length sets the result's shape)."""
    start, limit, delta = (g.const(name, node, what) for name, what in zip(ins, ("start", "limit", "delta")))
    count = max(int(np.ceil((limit - start) / delta)), 0)
    return [(start + np.arange(count) * delta).astype(start.dtype)]


@converts("Size")
def _size(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if not x.type.is_static:
        raise NotImplementedError(f"Size node '{node.name}': the size of {x.type} is only known at run time")
    return [np.array(int(np.prod(x.type.shape)), np.int64)]


@converts("ConstantOfShape")
def _constant_of_shape(g, node, ins, attrs):
    from onnx import numpy_helper
    shape = [int(v) for v in g.const(ins[0], node, "shape")]
    value = numpy_helper.to_array(attrs["value"]) if "value" in attrs else np.zeros(1, np.float32)
    return [np.full(shape, value.reshape(-1)[0], value.dtype)]


@converts("Tile")
def _tile(g, node, ins, attrs):
    x = g.tensor(ins[0])
    repeats = [int(r) for r in g.const(ins[1], node, "repeats")]
    for axis, r in enumerate(repeats):
        if r != 1:
            x = g.d("mlc.concat", *([x] * r), axis=axis) if r > 0 else None
            if x is None:
                raise NotImplementedError(f"Tile node '{node.name}': zero repeats are not imported")
    return [x]


@converts("Trilu")
def _trilu(g, node, ins, attrs):
    x = g.tensor(ins[0])
    if None in x.type.shape[-2:]:
        raise NotImplementedError(f"Trilu node '{node.name}': the matrices' sizes must be known at import")
    k = int(g.const(ins[1], node, "k")) if len(ins) > 1 and ins[1] else 0
    rows, cols = x.type.shape[-2:]
    keep = (np.triu if attrs.get("upper", 1) else np.tril)(np.ones((rows, cols), bool), k)
    return [g.d("mlc.select", g.d.const(keep), x, g.d.scalar(0, x))]


@converts("Hardmax")
def _hardmax(g, node, ins, attrs):
    x = g.tensor(ins[0])
    axis = attrs.get("axis", -1) % x.type.rank
    if g.opset < 13 or not x.type.is_static:
        raise NotImplementedError(f"Hardmax node '{node.name}': opsets before 13 and ? dims are not imported")
    best = g.d("mlc.argmax", x, axes=[axis], keepdims=True)
    positions = g.d("mlc.iota", axis=axis, result_type=x.type.with_element(best.type.element))
    return [g.d("mlc.cast", g.d("mlc.eq", positions, best), result_type=x.type)]


@converts("Einsum")
def _einsum(g, node, ins, attrs):
    """Einsum as sums over the letters one operand alone has, transposes, and batched matrix products
    of each pair of operands in turn (a letter repeated within one operand, a diagonal, is refused)."""
    operands = [g.tensor(i) for i in ins]
    equation = attrs["equation"].replace(" ", "")
    given, _, out = equation.partition("->")
    terms = given.split(",")
    if len(terms) != len(operands):
        raise NotImplementedError(f"Einsum node '{node.name}': '{equation}' does not match its {len(operands)} operands")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    ellipsis = "".join(next(spare) for _ in range(max((v.type.rank - len(t) + 3 for t, v in zip(terms, operands) if "..." in t), default=0)))
    terms = [t.replace("...", ellipsis[len(ellipsis) - (v.type.rank - len(t) + 3):]) for t, v in zip(terms, operands)]
    if "->" not in equation:  # implicit: the letters used once, in order (after the ellipsis)
        out = ellipsis + "".join(sorted(c for c in set("".join(terms)) if "".join(terms).count(c) == 1 and c not in ellipsis))
    else:
        out = out.replace("...", ellipsis[len(ellipsis) - max((v.type.rank - len(t) for t, v in zip(terms, operands)), default=0):])
    if any(len(set(t)) != len(t) for t in terms) or len(set(out)) != len(out):
        raise NotImplementedError(f"Einsum node '{node.name}': '{equation}' takes a diagonal, which is not imported")
    pairs = list(zip(terms, operands))
    term, value = _einsum_sum_alone(g, *pairs[0], [t for t, _ in pairs[1:]], out)
    for k, (other_term, other) in enumerate(pairs[1:], 1):
        later = "".join(t for t, _ in pairs[k + 1:]) + out
        other_term, other = _einsum_sum_alone(g, other_term, other, [term] + [t for t, _ in pairs[k + 1:]], out)
        term, value = _einsum_product(g, term, value, other_term, other, later)
    return [g.d("mlc.transpose", value, perm=[term.index(c) for c in out]) if term != out else value]


def _einsum_sum_alone(g, term: str, v: Value, others: list, out: str) -> tuple:
    """v summed over the letters no other operand nor the output has."""
    alone = [k for k, c in enumerate(term) if c not in out and not any(c in t for t in others)]
    if not alone:
        return term, v
    return "".join(c for k, c in enumerate(term) if k not in alone), g.d("mlc.reduce_sum", v, axes=alone, keepdims=False)


def _einsum_product(g, left: str, a: Value, right: str, b: Value, later: str) -> tuple:
    """(letters, value) of the product of two operands summed over the letters they share that no
    later operand nor the output needs: one batched matmul [batch, rows, shared] x [batch, shared, cols]."""
    d = g.d
    batch = [c for c in left if c in right and c in later]
    shared = [c for c in left if c in right and c not in later]
    rows, cols = [c for c in left if c not in right], [c for c in right if c not in left]
    a = d("mlc.transpose", a, perm=[left.index(c) for c in batch + rows + shared])
    b = d("mlc.transpose", b, perm=[right.index(c) for c in batch + shared + cols])
    nb, nr, ns = len(batch), len(rows), len(shared)
    row_dims, col_dims = a.type.shape[nb:nb + nr], b.type.shape[nb + ns:]
    a = d.reshape(a, a.type.shape[:nb] + (_product(row_dims), _product(a.type.shape[nb + nr:])))
    b = d.reshape(b, b.type.shape[:nb] + (_product(b.type.shape[nb:nb + ns]), _product(col_dims)))
    y = d("mlc.matmul", a, b)
    return "".join(batch + rows + cols), d.reshape(y, y.type.shape[:nb] + row_dims + col_dims)


def _product(dims) -> int | None:
    return None if None in dims else int(np.prod(dims, dtype=np.int64))


# --- recurrent layers: mlc.scan over the steps, one per direction -------------------------------------------

RECURRENT = {"RNN": 1, "GRU": 3, "LSTM": 4}  # gates per layer
DEFAULT_ACTIVATIONS = {"RNN": ["tanh"], "GRU": ["sigmoid", "tanh"], "LSTM": ["sigmoid", "tanh", "tanh"]}


@converts(*RECURRENT)
def _recurrent(g, node, ins, attrs):
    """ONNX's RNN / GRU / LSTM (default activations; no peepholes, clip or sequence_lens other than
    the full length), as an mlc.scan per direction: the input projections of all steps are one product
    before it, the recurrence inside. Outputs Y [steps, directions, batch, hidden], Y_h (and LSTM's Y_c)."""
    kind, gates = node.op_type, RECURRENT[node.op_type]
    given = lambda k: len(ins) > k and ins[k]  # noqa: E731
    directions = {"forward": [False], "reverse": [True], "bidirectional": [False, True]}[attrs.get("direction", "forward")]
    defaults = DEFAULT_ACTIVATIONS[kind] * len(directions)
    unsupported = [what for what, bad in (
        ("activations", [a.lower() for a in attrs.get("activations", defaults)] != defaults), ("clip", "clip" in attrs), ("input_forget", attrs.get("input_forget", 0)),
        ("peepholes", kind == "LSTM" and given(7))) if bad]
    if unsupported:
        raise NotImplementedError(f"{kind} node '{node.name}': {', '.join(unsupported)} are not imported")
    x = g.tensor(ins[0])
    if attrs.get("layout", 0):
        x = g.d("mlc.transpose", x, perm=[1, 0, 2])
    steps, batch = x.type.shape[0], x.type.shape[1]
    if given(4):
        lens = g.const(ins[4], node, "sequence_lens")
        if steps is None or np.any(lens != steps):
            raise NotImplementedError(f"{kind} node '{node.name}': sequences of different lengths are not imported")
    hidden = attrs["hidden_size"]
    w, r = g.tensor(ins[1]), g.tensor(ins[2])
    b = g.tensor(ins[3]) if given(3) else None
    ys, finals = [], []
    for k, reverse in enumerate(directions):
        def pick(v):
            one = g.d("mlc.slice", v, start=[k] + [0] * (v.type.rank - 1), limit=[k + 1] + list(v.type.shape[1:]),
                      stride=[1] * v.type.rank)
            return g.d.reshape(one, v.type.shape[1:])
        wk, rk = pick(w), pick(r)
        bk = pick(b) if b is not None else None
        initial = [pick(g.tensor(ins[5])) if given(5) else None] + ([pick(g.tensor(ins[6])) if given(6) else None] if kind == "LSTM" else [])
        y, last = _direction(g, kind, gates, hidden, x, wk, rk, bk, initial, reverse, attrs.get("linear_before_reset", 0), batch)
        ys.append(g.d.reshape(y, (steps, 1, batch, hidden)))
        finals.append([g.d.reshape(v, (1, batch, hidden)) for v in last])
    y = ys[0] if len(ys) == 1 else g.d("mlc.concat", *ys, axis=1)
    if attrs.get("layout", 0):
        y = g.d("mlc.transpose", y, perm=[2, 0, 1, 3])
    outputs = [y]
    for n in range(len(finals[0])):
        state = finals[0][n] if len(finals) == 1 else g.d("mlc.concat", *(f[n] for f in finals), axis=0)
        outputs.append(g.d("mlc.transpose", state, perm=[1, 0, 2]) if attrs.get("layout", 0) else state)
    return outputs


def _direction(g, kind, gates, hidden, x, w, r, b, initial, reverse, linear_before_reset, batch):
    """One direction's scan: (Y [steps, batch, hidden], [h_last] or [h_last, c_last])."""
    from mlc.ir.core import Block, Region
    d = g.d
    e = x.type.element
    # all steps' input projections at once: x [steps, batch, input] @ w^T [input, gates * hidden] (+ Wb)
    projected = d("mlc.matmul", x, d.swap_last(w))
    if b is not None:
        wb = d("mlc.slice", b, start=[0], limit=[gates * hidden], stride=[1])
        projected = d("mlc.add", projected, wb)
        rb = d("mlc.slice", b, start=[gates * hidden], limit=[2 * gates * hidden], stride=[1])
    else:
        rb = None
    state_type = TensorType((batch, hidden), e)
    zeros = d.zeros_of(state_type) if batch is not None else None
    carries = []
    for v in initial:
        if v is None and zeros is None:
            raise NotImplementedError("a recurrent layer of unknown batch size needs its initial state")
        carries.append(v if v is not None else zeros)
    block = Block([c.type for c in carries] + [projected.type.with_shape(projected.type.shape[1:])])
    inner = d.inside(block)
    states, step_input = list(block.args[:-1]), block.args[-1]
    rt = inner.swap_last(r)

    def gate(v, k):
        return _slice_columns(inner, v, k * hidden, (k + 1) * hidden)
    h = states[0]
    recurrent = inner("mlc.matmul", h, rt)
    if rb is not None:
        recurrent = inner("mlc.add", recurrent, rb)
    if kind == "RNN":
        new = [inner("mlc.tanh", inner("mlc.add", step_input, recurrent))]
        out = new[0]
    elif kind == "LSTM":
        total = inner("mlc.add", step_input, recurrent)
        i, o, f, c_in = (gate(total, k) for k in range(4))
        i, o, f = (inner("mlc.sigmoid", v) for v in (i, o, f))
        c = inner("mlc.add", inner("mlc.mul", f, states[1]), inner("mlc.mul", i, inner("mlc.tanh", c_in)))
        out = inner("mlc.mul", o, inner("mlc.tanh", c))
        new = [out, c]
    else:  # GRU: gates z, r, h
        z = inner("mlc.sigmoid", inner("mlc.add", gate(step_input, 0), gate(recurrent, 0)))
        reset = inner("mlc.sigmoid", inner("mlc.add", gate(step_input, 1), gate(recurrent, 1)))
        if linear_before_reset:
            candidate = inner("mlc.add", gate(step_input, 2), inner("mlc.mul", reset, gate(recurrent, 2)))
        else:
            rh = inner("mlc.matmul", inner("mlc.mul", reset, h), _slice_columns(inner, rt, 2 * hidden, 3 * hidden))
            if rb is not None:
                rh = inner("mlc.add", rh, inner("mlc.slice", rb, start=[2 * hidden], limit=[3 * hidden], stride=[1]))
            candidate = inner("mlc.add", gate(step_input, 2), rh)
        candidate = inner("mlc.tanh", candidate)
        one = inner.scalar(1, z)
        out = inner("mlc.add", inner("mlc.mul", inner("mlc.sub", one, z), candidate), inner("mlc.mul", z, h))
        new = [out]
    inner.b.create("mlc.yield", new + [out])
    attrs = {"num_carries": len(carries), **({"reverse": True} if reverse else {})}
    scan = g.b.create("mlc.scan", carries + [projected], attrs, regions=[Region([block])])
    results = list(scan.results)
    return results[len(carries)], results[:len(carries)]


def _slice_columns(d, v, first: int, last: int):
    """Columns first..last of a matrix (whose row count may be ?: slice bounds clamp to the dim)."""
    rows = v.type.shape[0]
    return d("mlc.slice", v, start=[0, first], limit=[rows if rows is not None else ALL, last], stride=[1, 1])


ALL = 1 << 62  # a slice bound past any dim


# --- losses -------------------------------------------------------------------------------------------------

@converts("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss")
def _nll(g, node, ins, attrs):
    """loss[n, d...] = -weight[t] * x[n, t, d...] (x the log-probabilities; SoftmaxCrossEntropyLoss
    takes them from its scores), 0 where t is ignore_index; reduced by `reduction` (mean: over the
    weights of the counted elements). The class is picked by comparing iota with the target."""
    x, target = g.tensor(ins[0]), g.tensor(ins[1])
    if not x.type.is_static or x.type.rank < 2:
        raise NotImplementedError(f"{node.op_type} node '{node.name}': scores of static shape [N, C, ...] are imported")
    d = g.d
    log_prob = d("mlc.log_softmax", x, axis=1) if node.op_type == "SoftmaxCrossEntropyLoss" else x
    expanded = d.reshape(target, target.type.shape[:1] + (1,) + target.type.shape[1:])
    classes = d("mlc.iota", axis=1, result_type=log_prob.type.with_element(target.type.element))
    picked = d("mlc.reduce_sum", d("mlc.mul", log_prob, d("mlc.cast", d("mlc.eq", classes, expanded), result_type=log_prob.type)),
               axes=[1], keepdims=False)
    counted = d("mlc.ne", target, d.scalar(attrs["ignore_index"], target)) if "ignore_index" in attrs else None
    safe = d("mlc.select", counted, target, d.scalar(0, target)) if counted is not None else target  # (ignored: any class)
    weight = d("mlc.gather", g.tensor(ins[2]), safe, axis=0) if len(ins) > 2 and ins[2] else None
    if counted is not None:
        kept = d("mlc.cast", counted, result_type=picked.type)
        weight = kept if weight is None else d("mlc.mul", weight, kept)
    loss = d("mlc.neg", picked if weight is None else d("mlc.mul", picked, weight))
    reduction = attrs.get("reduction", "mean")
    every = list(range(loss.type.rank))
    if reduction == "sum":
        loss = d("mlc.reduce_sum", loss, axes=every, keepdims=False)
    elif reduction == "mean":
        total = d("mlc.reduce_sum", loss, axes=every, keepdims=False)
        loss = d("mlc.div", total, d("mlc.reduce_sum", weight, axes=every, keepdims=False)) if weight is not None else \
            d("mlc.reduce_mean", loss, axes=every, keepdims=False)
    return [loss, log_prob]


@converts("Mod")
def _mod(g, node, ins, attrs):
    """fmod=1: the remainder with the sign of a (C's fmod); fmod=0: with the sign of b, as Python's %."""
    a, b = g.tensor(ins[0]), g.tensor(ins[1])
    d = g.d
    rest = d("mlc.rem", a, b)
    if attrs.get("fmod", 0) or a.type.element.is_unsigned:
        return [rest]
    zero = d.scalar(0, rest)
    other_sign = d("mlc.and", d("mlc.ne", rest, zero), d("mlc.ne", d("mlc.lt", rest, zero), d("mlc.lt", b, zero)))
    return [d("mlc.select", other_sign, d("mlc.add", rest, b), rest)]
