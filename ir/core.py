"""The IR's data structures: values with use lists, operations, blocks, regions, modules.

Ops in a block form an intrusive doubly linked list, so inserting and erasing are O(1) however large
the function; `block.ops` is a snapshot that is safe to iterate while rewriting.
"""
from __future__ import annotations

from typing import Iterator

from .attributes import Attribute, StringAttr, SymbolRefAttr, TypeAttr, to_attr
from .diagnostics import UNKNOWN, Location
from .registry import lookup_op
from .types import FunctionType, Type


class Value:
    __slots__ = ("type", "name_hint", "uses")

    def __init__(self, type: Type, name_hint: str | None = None):
        self.type = type
        self.name_hint = name_hint
        self.uses: dict[tuple[Operation, int], None] = {}  # an ordered set of (user, operand index)

    @property
    def users(self) -> list[Operation]:
        return list(dict.fromkeys(op for op, _ in self.uses))

    def replace_all_uses_with(self, new: "Value"):
        if new is self:
            return
        for op, i in list(self.uses):
            op.set_operand(i, new)

    def defining_op(self) -> "Operation | None":
        return None


class OpResult(Value):
    __slots__ = ("owner", "index")

    def __init__(self, type, owner, index, name_hint=None):
        super().__init__(type, name_hint)
        self.owner, self.index = owner, index

    def defining_op(self):
        return self.owner


class BlockArgument(Value):
    __slots__ = ("owner", "index")

    def __init__(self, type, owner, index, name_hint=None):
        super().__init__(type, name_hint)
        self.owner, self.index = owner, index


class Operation:
    """A generic operation; what it means is in its registry entry, `op.opdef`."""
    __slots__ = ("name", "operands", "results", "attributes", "regions", "loc", "parent",
                 "prev", "next", "opdef", "__weakref__")

    def __init__(self, name: str, operands=(), result_types=(), attributes=None, regions=(),
                 loc: Location = UNKNOWN, result_names=None, opdef=None):
        self.name = name
        self.opdef = opdef if opdef is not None else lookup_op(name)
        self.operands: list[Value] = list(operands)
        for i, v in enumerate(self.operands):
            v.uses[(self, i)] = None
        if result_types:
            names = result_names or [None] * len(result_types)
            self.results = [OpResult(t, self, i, n) for i, (t, n) in enumerate(zip(result_types, names))]
        else:
            self.results = []
        self.attributes: dict[str, Attribute] = dict(attributes) if attributes else {}
        self.regions: list[Region] = []
        for r in regions:
            self.add_region(r)
        self.loc = loc
        self.parent: Block | None = None
        self.prev = self.next = None

    # --- operands and regions ----------------------------------------------------------------
    def set_operand(self, i: int, v: Value):
        old = self.operands[i]
        old.uses.pop((self, i), None)
        self.operands[i] = v
        v.uses[(self, i)] = None

    def set_operands(self, values):
        self.drop_operands()
        for i, v in enumerate(values):
            self.operands.append(v)
            v.uses[(self, i)] = None

    def drop_operands(self):
        for i, v in enumerate(self.operands):
            v.uses.pop((self, i), None)
        self.operands = []

    def set_results(self, types, names=None):
        """Create the results of an op built before its result types were known."""
        if names:
            self.results = [OpResult(t, self, i, n) for i, (t, n) in enumerate(zip(types, names))]
        else:
            self.results = [OpResult(t, self, i, None) for i, t in enumerate(types)]

    def add_region(self, region: "Region"):
        region.parent = self
        self.regions.append(region)

    @property
    def result(self) -> Value:
        assert len(self.results) == 1, f"{self.name} has {len(self.results)} results"
        return self.results[0]

    @property
    def operand_types(self):
        return [v.type for v in self.operands]

    @property
    def result_types(self):
        return [v.type for v in self.results]

    def attr(self, name: str, default=None):
        """The plain value of an attribute, or its registered default."""
        a = self.attributes.get(name)
        if a is not None:
            return a.value
        if self.opdef is not None and name in self.opdef.attrs:
            d = self.opdef.attrs[name].default
            return d if d is not None else default
        return default

    def set_attr(self, name: str, value):
        self.attributes[name] = to_attr(value)

    # --- position --------------------------------------------------------------------------------
    @property
    def parent_op(self) -> "Operation | None":
        return self.parent.parent.parent if self.parent and self.parent.parent else None

    def is_within(self, ops) -> bool:
        """This op is one of `ops` (a set) or nested in one of their regions."""
        op = self
        while op is not None:
            if op in ops:
                return True
            op = op.parent_op
        return False

    def erase(self):
        """Detach from the block and drop all uses; the results must be unused."""
        for r in self.results:
            assert not r.uses, f"erasing {self.name} whose result still has uses"
        self.detach()
        self.drop_all_references()

    def drop_all_references(self):
        self.drop_operands()
        for r in self.regions:
            for op in r.walk():
                op.drop_operands()

    def detach(self):
        if self.parent is not None:
            self.parent._unlink(self)

    def replace_with(self, values):
        """Replace every use of each result with the matching value, then erase."""
        for r, v in zip(self.results, values):
            r.replace_all_uses_with(v)
        self.erase()

    # --- traversal -----------------------------------------------------------------------------------
    def walk(self) -> Iterator["Operation"]:
        """Pre-order over this op and every op nested in its regions."""
        return _preorder([self])

    def clone(self, mapping: dict | None = None) -> "Operation":
        """A deep copy; operands are remapped through `mapping` (filled with this op's results)."""
        mapping = {} if mapping is None else mapping
        op = type(self)(self.name, [mapping.get(v, v) for v in self.operands], self.result_types,
                       self.attributes, loc=self.loc, result_names=[r.name_hint for r in self.results],
                       opdef=self.opdef)
        for old, new in zip(self.results, op.results):
            mapping[old] = new
        for r in self.regions:
            op.add_region(r.clone(mapping))
        return op

    def __repr__(self):
        return f"<{self.name} at {self.loc}>"

    def __str__(self):
        from .printer import print_op
        return print_op(self)


class Block:
    __slots__ = ("args", "parent", "first", "last", "_len")

    def __init__(self, arg_types=(), arg_names=None):
        names = arg_names or [None] * len(arg_types)
        self.args = [BlockArgument(t, self, i, n) for i, (t, n) in enumerate(zip(arg_types, names))]
        self.parent: Region | None = None
        self.first = self.last = None
        self._len = 0

    def add_arg(self, type: Type, name=None) -> BlockArgument:
        a = BlockArgument(type, self, len(self.args), name)
        self.args.append(a)
        return a

    def __iter__(self):
        op = self.first
        while op is not None:
            nxt = op.next
            yield op
            op = nxt

    def __len__(self):
        return self._len

    @property
    def ops(self) -> list[Operation]:
        return list(self)

    @property
    def terminator(self) -> Operation | None:
        return self.last

    def append(self, op: Operation) -> Operation:
        return self.insert_before(None, op)

    def insert_before(self, anchor: Operation | None, op: Operation) -> Operation:
        """Insert `op` before `anchor` (at the end when anchor is None)."""
        assert op.parent is None, "op is already in a block"
        op.parent = self
        op.next = anchor
        op.prev = self.last if anchor is None else anchor.prev
        if op.prev is None:
            self.first = op
        else:
            op.prev.next = op
        if anchor is None:
            self.last = op
        else:
            anchor.prev = op
        self._len += 1
        return op

    def insert_after(self, anchor: Operation, op: Operation) -> Operation:
        return self.insert_before(anchor.next, op)

    def _unlink(self, op: Operation):
        if op.prev is None:
            self.first = op.next
        else:
            op.prev.next = op.next
        if op.next is None:
            self.last = op.prev
        else:
            op.next.prev = op.prev
        op.parent = op.prev = op.next = None
        self._len -= 1

    def walk(self) -> Iterator[Operation]:
        return _preorder(list(self))

    def nested_blocks(self) -> list["Block"]:
        """This block and every block in the regions of the ops within it."""
        return [self, *(b for op in self.walk() for r in op.regions for b in r.blocks)]


class Region:
    __slots__ = ("blocks", "parent")

    def __init__(self, blocks=()):
        self.blocks: list[Block] = []
        self.parent: Operation | None = None
        for b in blocks:
            self.add_block(b)

    def add_block(self, block: Block) -> Block:
        block.parent = self
        self.blocks.append(block)
        return block

    @property
    def block(self) -> Block:
        return self.blocks[0]

    def walk(self) -> Iterator[Operation]:
        return _preorder([op for b in self.blocks for op in b])

    def clone(self, mapping: dict) -> "Region":
        region = Region()
        for b in self.blocks:
            nb = Block([a.type for a in b.args], [a.name_hint for a in b.args])
            mapping.update(zip(b.args, nb.args))
            region.add_block(nb)
            for op in b:
                nb.append(op.clone(mapping))
        return region


def _preorder(ops: list) -> Iterator[Operation]:
    """`ops` in order, each followed by the ops nested in its regions, depth first: one generator and a
    stack, not a generator per level of nesting (walks were a tenth of compiling a model). A block's
    ops are read when its op is reached."""
    stack = ops[::-1]
    while stack:
        op = stack.pop()
        yield op
        for r in reversed(op.regions):
            for b in reversed(r.blocks):
                inner = list(b)
                inner.reverse()
                stack.extend(inner)


# --- functions and modules -----------------------------------------------------------------------

class FuncOp(Operation):
    """`func.func`: a symbol with a function type and a body region."""
    __slots__ = ()

    @classmethod
    def build(cls, name: str, arg_types, result_types, arg_names=None, loc=UNKNOWN, private=False):
        attrs = {"sym_name": StringAttr(name), "function_type": TypeAttr(FunctionType(tuple(arg_types), tuple(result_types)))}
        if private:
            attrs["sym_visibility"] = StringAttr("private")
        op = cls("func.func", attributes=attrs, regions=[Region([Block(arg_types, arg_names)])], loc=loc)
        return op

    @property
    def sym_name(self) -> str:
        return self.attributes["sym_name"].value

    @property
    def type(self) -> FunctionType:
        return self.attributes["function_type"].value

    @property
    def body(self) -> Block:
        return self.regions[0].block

    @property
    def args(self):
        return self.body.args

    @property
    def is_private(self) -> bool:
        vis = self.attributes.get("sym_visibility")
        return vis is not None and vis.value == "private"

    def set_type(self, inputs, results):
        self.attributes["function_type"] = TypeAttr(FunctionType(tuple(inputs), tuple(results)))


class Module:
    """A module: a symbol table of functions and globals, plus module attributes (e.g. `seed`)."""

    def __init__(self, name: str | None = None, attributes=None, loc: Location = UNKNOWN):
        self.name = name
        self.attributes: dict[str, Attribute] = dict(attributes or {})
        self.body = Block()
        self.body.parent = None
        self.loc = loc

    def append(self, op: Operation) -> Operation:
        return self.body.append(op)

    @property
    def ops(self) -> list[Operation]:
        return self.body.ops

    def symbols(self) -> dict[str, Operation]:
        table = {}
        for op in self.body:
            a = op.attributes.get("sym_name")
            if a is not None:
                table.setdefault(a.value, op)
        return table

    def lookup(self, name: str) -> Operation | None:
        for op in self.body:
            a = op.attributes.get("sym_name")
            if a is not None and a.value == name:
                return op
        return None

    @property
    def functions(self) -> dict[str, FuncOp]:
        return {op.sym_name: op for op in self.body if op.name == "func.func"}

    @property
    def globals(self) -> dict[str, Operation]:
        return {op.attributes["sym_name"].value: op for op in self.body if op.name == "mlc.global"}

    @property
    def seed(self) -> int:
        a = self.attributes.get("seed")
        return int(a.value) if a is not None else 0

    def walk(self) -> Iterator[Operation]:
        return self.body.walk()

    def dispose(self):
        """Breaks the module's reference cycles (ops and their blocks, values and their users), so that
        it is freed the moment it is dropped rather than by the cycle collector, which walked a lowered
        ResNet-18's ~250k objects for 0.2 s of its compile. The module is unusable afterwards."""
        for op in list(self.walk()):
            for region in op.regions:
                for block in region.blocks:
                    for arg in block.args:
                        arg.uses = arg.owner = None
                    block.args = block.parent = block.first = block.last = None
                region.blocks = region.parent = None
            for result in op.results:
                result.uses = result.owner = None
            op.operands = op.results = op.regions = op.parent = op.prev = op.next = None
        self.body = None

    def clone(self) -> "Module":
        m = Module(self.name, self.attributes, self.loc)
        mapping: dict = {}
        for op in self.body:
            m.append(op.clone(mapping))
        return m

    def __str__(self):
        from .printer import print_module
        return print_module(self)

    def __repr__(self):
        return f"<Module @{self.name} with {len(self.body)} symbols>"


def create_op(name: str, operands=(), result_types=(), attributes=None, regions=(), loc=UNKNOWN, result_names=None):
    """Make an op of the class its registry entry asks for (FuncOp for func.func)."""
    opdef = lookup_op(name)
    cls = getattr(opdef, "cls", None) or Operation
    return cls(name, operands, result_types, attributes, regions, loc, result_names, opdef)


def symbol_uses(op: Operation) -> Iterator[str]:
    """Names of the symbols an op (and its regions) refers to."""
    for o in op.walk():
        for name, a in o.attributes.items():
            if isinstance(a, SymbolRefAttr) and name != "sym_name":
                yield a.value


class Builder:
    """Creates ops at an insertion point; result types are inferred from the registry when not given.

        b = Builder.at_end(func.body, module)
        y = b.create("mlc.add", [x, w]).result
        b.create("func.return", [y])
    """

    def __init__(self, block: Block, before: Operation | None = None, module: "Module | None" = None,
                 loc: Location = UNKNOWN):
        self.block, self.anchor, self.loc = block, before, loc
        self.symbols = module.symbols() if module is not None else {}

    @classmethod
    def at_end(cls, block: Block, module=None, loc: Location = UNKNOWN) -> "Builder":
        return cls(block, None, module, loc)

    @classmethod
    def before(cls, op: Operation, module=None) -> "Builder":
        return cls(op.parent, op, module, op.loc)

    @classmethod
    def after(cls, op: Operation, module=None) -> "Builder":
        return cls(op.parent, op.next, module, op.loc)

    def create(self, name: str, operands=(), attributes=None, result_types=None, regions=(), name_hint=None) -> Operation:
        """Build `name` (attributes may be plain Python values) and insert it; raises VerifyError when
        the result types cannot be inferred."""
        attrs = {k: to_attr(v) for k, v in (attributes or {}).items()}
        op = create_op(name, operands, (), attrs, regions, self.loc)
        if result_types is None:
            if op.opdef is None:
                raise ValueError(f"unknown operation '{name}'")
            result_types = op.opdef.infer(op, self)
        op.set_results(list(result_types), [name_hint] * len(result_types) if name_hint else None)
        self.block.insert_before(self.anchor, op)
        return op
