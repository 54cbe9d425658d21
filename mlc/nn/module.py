"""nn.Module: PyTorch's module protocol over mlc variables.

Attributes that are Parameters, Buffers or Modules are registered in assignment order, so
`named_parameters()` and `state_dict()` give PyTorch's names in PyTorch's order. Calling a module on
numpy arrays traces its `forward` once per input signature and training flag, compiles it
(mlc.jit) and runs it; the parameters are passed on each call, so training and load_state_dict never
retrace. Inside a trace, calling a module just records its ops.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict

import numpy as np

from ..jit import jit
from ..tensor import Buffer, Parameter, Variable
from ..trace_stack import _STACK

_TREE_VERSION = [0]  # bumped when any module's members or training flag change: calls re-read their modes


class Module:
    training = True

    def __init__(self):
        object.__setattr__(self, "_members", OrderedDict())  # name -> Variable or Module, in order
        object.__setattr__(self, "_compiled", {})

    def __setattr__(self, name, value):
        members = self.__dict__.get("_members")
        if members is None:
            raise AttributeError(f"{type(self).__name__}: call super().__init__() before assigning {name}")
        if isinstance(value, (Variable, Module)):
            members[name] = value
        else:
            members.pop(name, None)
        object.__setattr__(self, name, value)
        _TREE_VERSION[0] += 1

    def __delattr__(self, name):
        self._members.pop(name, None)
        object.__delattr__(self, name)
        _TREE_VERSION[0] += 1

    def register_buffer(self, name: str, value, persistent: bool = True):
        buf = value if isinstance(value, Buffer) else Buffer(np.asarray(value))
        buf.persistent = persistent
        setattr(self, name, buf)

    def forward(self, *args):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    # --- calling ---
    def __call__(self, *args, **kwargs):
        if _STACK:
            return self.forward(*args, **kwargs)
        if kwargs:  # the compiled function takes its arguments by position
            args = _positional(self.forward, args, kwargs)
        version, key = self.__dict__.get("_modes", (None, None))
        if version != _TREE_VERSION[0]:  # (each module's training flag, read again after any change)
            version, key = _TREE_VERSION[0], tuple(m.training for m in self.modules())
            object.__setattr__(self, "_modes", (version, key))
        compiled = self._compiled.get(key)
        if compiled is None:
            compiled = self._compiled[key] = jit(self.forward, names=self._variable_names)
            compiled.__name__ = type(self).__name__.lower()
        return compiled(*args)

    def _variable_names(self) -> dict:
        return {id(v): name for name, v in self.named_variables()}

    # --- the tree ---
    def named_children(self):
        return ((n, m) for n, m in self._members.items() if isinstance(m, Module))

    def children(self):
        return (m for _, m in self.named_children())

    def named_modules(self, prefix: str = "", seen=None):
        seen = set() if seen is None else seen
        if id(self) in seen:
            return
        seen.add(id(self))
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name, seen)

    def modules(self):
        return (m for _, m in self.named_modules())

    def named_variables(self, kinds=(Variable,)):
        """(qualified name, variable) for this module's own variables, then its children's; shared ones once."""
        seen = set()
        for prefix, module in self.named_modules():
            for name, v in module._members.items():
                if isinstance(v, kinds) and id(v) not in seen:
                    seen.add(id(v))
                    yield (f"{prefix}.{name}" if prefix else name), v

    def named_parameters(self):
        return self.named_variables((Parameter,))

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        return self.named_variables((Buffer,))

    def buffers(self):
        return [b for _, b in self.named_buffers()]

    def apply(self, fn):
        for m in self.modules():
            fn(m)
        return self

    # --- modes ---
    def train(self, mode: bool = True):
        for m in self.modules():
            object.__setattr__(m, "training", mode)
        _TREE_VERSION[0] += 1
        return self

    def eval(self):
        return self.train(False)

    # --- state ---
    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Parameters and persistent buffers under PyTorch's keys; the arrays are the live values."""
        return OrderedDict((name, v.data) for name, v in self.named_variables()
                           if getattr(v, "persistent", True))

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy arrays (numpy, or anything with .numpy(), e.g. torch tensors) into the variables."""
        own = OrderedDict((n, v) for n, v in self.named_variables() if getattr(v, "persistent", True))
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if strict and (missing or unexpected):
            raise KeyError(f"{type(self).__name__}.load_state_dict: missing keys {missing}, unexpected keys {unexpected}")
        for name, value in state_dict.items():
            if name not in own:
                continue
            array = _to_numpy(value)
            var = own[name]
            if array.shape != var.shape:
                raise ValueError(f"{type(self).__name__}.load_state_dict: '{name}' has shape {array.shape} "
                                 f"but the module's is {var.shape}")
            var.data[...] = array.astype(var.dtype, copy=False)
        return missing, unexpected

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = [f"  ({n}): " + repr(m).replace("\n", "\n  ") for n, m in self.named_children()]
        head = f"{type(self).__name__}({self.extra_repr()}"
        return head + ("\n" + "\n".join(children) + "\n)" if children else ")")


def _positional(fn, args, kwargs) -> tuple:
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.args


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    elif isinstance(value, Variable):
        value = value.data
    return np.asarray(value)


class Sequential(Module):
    def __init__(self, *modules):
        super().__init__()
        if len(modules) == 1 and isinstance(modules[0], (dict, OrderedDict)):
            modules = modules[0].items()
        else:
            modules = ((str(i), m) for i, m in enumerate(modules))
        for name, m in modules:
            setattr(self, name, m)

    def forward(self, x):
        for m in self.children():
            x = m(x)
        return x

    def __getitem__(self, i):
        return list(self.children())[i]

    def __len__(self):
        return len(list(self.children()))

    def __iter__(self):
        return iter(list(self.children()))

    def append(self, module):
        setattr(self, str(len(self)), module)
        return self


class ModuleList(Module):
    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module):
        setattr(self, str(len(self)), module)
        return self

    def extend(self, modules):
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, i):
        items = list(self.children())
        return ModuleList(items[i]) if isinstance(i, slice) else items[i]

    def __len__(self):
        return sum(1 for _ in self.children())

    def __iter__(self):
        return iter(list(self.children()))


class ModuleDict(Module):
    def __init__(self, modules=None):
        super().__init__()
        for name, m in (modules or {}).items():
            setattr(self, name, m)

    def __getitem__(self, name):
        return getattr(self, name)

    def __setitem__(self, name, module):
        setattr(self, name, module)

    def keys(self):
        return [n for n, _ in self.named_children()]

    def items(self):
        return list(self.named_children())

    def values(self):
        return list(self.children())

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())


def functional_call(module: Module, variables: dict, *args, **kwargs):
    """module's forward with some variables replaced by the given arrays or traced tensors, by state_dict
    key (torch.func.functional_call): e.g. to take gradients with respect to the parameters."""
    if not _STACK:  # traced with the variables as arguments, compiled once per key set and signature
        key = ("functional_call", tuple(variables))
        compiled = module._compiled.get(key)
        if compiled is None:
            compiled = module._compiled[key] = jit(lambda v, *a: functional_call(module, v, *a), names=module._variable_names)
            compiled.__name__ = type(module).__name__.lower()
        if kwargs:
            args = _positional(module.forward, args, kwargs)
        return compiled(dict(variables), *args)
    own = dict(module.named_variables())
    unknown = [k for k in variables if k not in own]
    if unknown:
        raise KeyError(f"functional_call: {type(module).__name__} has no variables {unknown}")
    saved = {}
    try:
        for prefix, m in module.named_modules():
            for name, v in list(m._members.items()):
                key = f"{prefix}.{name}" if prefix else name
                if key in variables:
                    saved[(id(m), name)] = (m, name, v)
                    object.__setattr__(m, name, variables[key])
        return module.forward(*args, **kwargs)
    finally:
        for m, name, v in saved.values():
            object.__setattr__(m, name, v)
