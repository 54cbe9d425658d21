"""mlc.optim: torch.optim's SGD, Adam and AdamW and its StepLR / CosineAnnealingLR, compiled into one
training step (the `train_step` pass) by `mlc.compile_train_step`.

    opt = mlc.optim.Adam(model.parameters(), lr=1e-3)
    step = mlc.compile_train_step(model, mlc.nn.functional.cross_entropy, opt)
    loss = step(x_batch, y_batch)      # forward, backward and the update, in native code

The parameters live in the model's variables, which the compiled step reads and updates in place,
so `model.state_dict()`, `model(x)` and `load_state_dict` see and change the same arrays. The
optimiser's state (moments, step count) lives in the executable; `optimizer.state` shows it. The
learning rate is read on every step from `optimizer.param_groups[0]["lr"]`, which schedulers set.

Data-parallel (under `mpiexec -n N python train.py`): `compile_train_step(..., data_parallel=True)`
joins the MPI world (mlc.distributed.init) and compiles the step with `train_step{data-parallel}`.
Each process calls it with its own share of the global batch (e.g. the rows
`np.array_split(batch, N)[rank]`); the step averages the gradients over the processes, weighted by
their numbers of examples, so for a loss that is a mean over the batch every process applies the
global batch's gradient. At its first call the step gives every process rank 0's parameters.
Batch norm in training normalises with the global batch's statistics (`sync_batch_norm=True`, the
default; False: each process's own, as torch's DDP without SyncBatchNorm).
"""
from __future__ import annotations

import math

import numpy as np

from .jit import default_backend, signature
from .pytree import flatten
from .tensor import Variable
from .trace_stack import _STACK, tracing_error
from .tracing import trace_function


class Optimizer:
    kind = ""

    def __init__(self, params, defaults: dict):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        for p in self.params:
            if not isinstance(p, Variable):
                raise TypeError(f"{type(self).__name__} optimises mlc Parameters (model.parameters()), got {type(p).__name__}")
        self.defaults = defaults
        self.param_groups = [dict(defaults, params=self.params)]
        self.step_function = None  # set by compile_train_step

    def pass_options(self) -> dict:
        raise NotImplementedError

    @property
    def state(self) -> dict:
        """{parameter: {"exp_avg": array, ...}}, live from the compiled step (empty before its first call)."""
        if self.step_function is None or self.step_function.program is None:
            return {}
        return self.step_function.program.optimizer_state()

    def step(self):
        raise RuntimeError("mlc optimisers run inside a compiled step: use mlc.compile_train_step(model, loss_fn, optimizer)")

    def zero_grad(self, set_to_none: bool = True):
        """Nothing to do: a compiled step computes fresh gradients every call."""


class SGD(Optimizer):
    kind = "sgd"

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False):
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov))

    def pass_options(self):
        g = self.param_groups[0]
        return {"momentum": g["momentum"], "dampening": g["dampening"], "nesterov": g["nesterov"], "weight-decay": g["weight_decay"]}


class Adam(Optimizer):
    kind = "adam"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def pass_options(self):
        g = self.param_groups[0]
        return {"beta1": g["betas"][0], "beta2": g["betas"][1], "eps": g["eps"], "weight-decay": g["weight_decay"]}


class AdamW(Adam):
    kind = "adamw"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, lr, betas, eps, weight_decay)


# --- learning-rate schedules (set param_groups[0]["lr"], as torch's do) --------------------------------

class _Scheduler:
    def __init__(self, optimizer: Optimizer, last_epoch: int = -1):
        self.optimizer = optimizer
        self.base_lr = optimizer.param_groups[0].setdefault("initial_lr", optimizer.param_groups[0]["lr"])
        self.last_epoch = last_epoch
        self.step()

    def step(self):
        self.last_epoch += 1
        self.optimizer.param_groups[0]["lr"] = self.lr_at(self.last_epoch)

    def get_last_lr(self) -> list[float]:
        return [self.optimizer.param_groups[0]["lr"]]


class StepLR(_Scheduler):
    def __init__(self, optimizer, step_size: int, gamma: float = 0.1, last_epoch: int = -1):
        self.step_size, self.gamma = step_size, gamma
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch):
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineAnnealingLR(_Scheduler):
    def __init__(self, optimizer, T_max: int, eta_min: float = 0.0, last_epoch: int = -1):
        self.T_max, self.eta_min = T_max, eta_min
        super().__init__(optimizer, last_epoch)

    def lr_at(self, epoch):
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * epoch / self.T_max)) / 2


class lr_scheduler:  # noqa: N801 (torch.optim.lr_scheduler's namespace)
    StepLR = StepLR
    CosineAnnealingLR = CosineAnnealingLR


# --- the compiled training step ----------------------------------------------------------------------

class Program:
    """A compiled module whose globals are the given variables: the executable reads and updates them
    in place (on the interpreter, they are copied in and out around each call)."""

    def __init__(self, module, backend: str, bindings: dict, optimizer: Optimizer, precision: str | None = None):
        self.bindings, self.backend, self.optimizer = bindings, backend, optimizer
        if backend == "interp":
            from mlc.ir.interpreter import Interpreter
            if precision is not None:
                from .api import run_passes
                module = run_passes(module.clone(), f"mixed-precision{{type={precision}}}")
            self.interp = Interpreter(module)
            self.globals = self.interp.globals
        else:
            from .api import compile as compile_module
            self.exe = compile_module(module, target=backend, precision=precision)
            self.globals = self.exe.globals

    def call(self, name: str, *arrays):
        if self.backend == "interp":
            for n, v in self.bindings.items():
                self.globals[n] = v.data
            result = self.interp.call_public(name, arrays)
            for n, v in self.bindings.items():
                if self.globals[n] is not v.data:
                    v.data[...] = self.globals[n]
            return result
        for n, v in self.bindings.items():
            if self.globals[n] is not v.data:
                self.exe.bind_global(n, _writeable(v))
        return self.exe[name](*arrays)

    def optimizer_state(self) -> dict:
        names = {id(v): n for n, v in self.bindings.items()}
        state = {}
        for p in self.optimizer.params:
            n = names.get(id(p))
            found = {k[len(n) + 1:]: a for k, a in self.globals.items() if n is not None and k.startswith(n + ".")}
            if found:
                state[p] = found
        return state


def _writeable(v: Variable) -> np.ndarray:
    if not (v.data.flags.c_contiguous and v.data.flags.writeable):
        v.data = np.array(v.data, order="C")
    return v.data


class TrainStep:
    """step(*inputs, target) -> loss: loss_fn(model(*inputs), target), its gradients with respect to the
    optimiser's parameters, and the update. With model=None, step(*batch) computes loss_fn(*batch)."""

    def __init__(self, model, loss_fn, optimizer: Optimizer, backend: str | None = None, dynamic_batch: bool = True,
                 precision: str | None = None, data_parallel: bool = False, sync_batch_norm: bool = True,
                 bucket_mb: float = 1.0):
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.backend, self.dynamic_batch, self.precision = backend, dynamic_batch, precision
        self.programs: dict = {}
        self.program = None
        self.data_parallel, self.synchronised = data_parallel, not data_parallel
        self.sync_batch_norm, self.bucket_mb = sync_batch_norm, bucket_mb
        if data_parallel:
            from .train import join_world
            join_world()
        optimizer.step_function = self

    def _loss(self, *batch):
        if self.model is None:
            return self.loss_fn(*batch)
        *inputs, target = batch
        return self.loss_fn(self.model(*inputs), target)

    def _compile(self, batch):
        from mlc.ir.attributes import UNIT, StringAttr
        from mlc.passes.train_step import TrainStep as TrainStepPass
        names = self.model._variable_names() if hasattr(self.model, "_variable_names") else {}
        traced = trace_function(self._loss, batch, variables="globals", dynamic_batch=self.dynamic_batch,
                                name="loss", names=dict(names))
        module, loss = traced.module, traced.func
        ret = loss.type.results
        if len(ret) != 1 or ret[0].rank != 0 or not ret[0].element.is_float:
            raise tracing_error(f"the loss must be one floating-point scalar, got ({', '.join(map(str, ret))})")
        trainable = {id(p) for p in self.optimizer.params}
        for name, var in traced.globals.items():  # only the optimiser's parameters are trained
            if id(var) not in trainable:
                module.globals[name].attributes.pop("trainable", None)
            module.globals[name].attributes["external"] = UNIT  # (bound to var.data, which Python code writes in place)
        if not trainable <= {id(v) for v in traced.globals.values()}:
            raise ValueError("some of the optimiser's parameters take no part in the loss")
        loss.attributes["sym_visibility"] = StringAttr("private")
        o = self.optimizer
        TrainStepPass(loss=loss.sym_name, optimizer=o.kind, lr=float(o.param_groups[0]["lr"]), schedule="global",
                      **{"data-parallel": self.data_parallel, "sync-batch-norm": self.sync_batch_norm, "bucket-mb": float(self.bucket_mb)},
                      **o.pass_options()).run(module)
        return Program(module, self.backend or default_backend(), traced.globals, o, self.precision)

    def __call__(self, *batch):
        if _STACK:
            raise tracing_error("a compiled training step cannot be called inside a traced function")
        leaves, structure = flatten(batch)
        key = (structure, signature(leaves, self.dynamic_batch))
        program = self.programs.get(key)
        if program is None:
            program = self.programs[key] = self._compile(batch)
        self.program = program
        if not self.synchronised:  # (once: with shares of different sizes, processes may compile at different calls)
            from mlc.ir.collectives import current
            comm = current()
            for v in program.bindings.values():
                _writeable(v)[...] = comm.bcast(np.ascontiguousarray(v.data), 0)
            self.synchronised = True
        program.globals["train_step.lr"][...] = self.optimizer.param_groups[0]["lr"]
        return program.call("train_step", *leaves)


def compile_train_step(model, loss_fn, optimizer: Optimizer, backend: str | None = None, dynamic_batch: bool = True,
                       precision: str | None = None, data_parallel: bool = False, sync_batch_norm: bool = True,
                       bucket_mb: float = 1.0) -> TrainStep:
    """One compiled function for a whole training step (see the module docstring); precision "bf16"
    or "f16" runs its products and convolutions (forward and backward) in half precision, the
    weights and the optimiser in f32. data_parallel: each process of an MPI world gives the step its
    share of the global batch, and the step applies the global batch's gradient (see above);
    sync_batch_norm: batch norm uses the global batch's statistics; bucket_mb: the gradients are
    all-reduced in buckets of this many megabytes, each as soon as it is computed (0: one at the end)."""
    return TrainStep(model, loss_fn, optimizer, backend, dynamic_batch, precision, data_parallel, sync_batch_norm, bucket_mb)
