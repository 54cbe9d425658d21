"""Training an .ir model: what `mlc train` runs (SPEC §5), callable from Python as `mlc.train.fit`.

The `train_step` pass turns the loss into one compiled step that updates the trainable globals and
the optimiser state in the executable. This module feeds it shuffled mini-batches, evaluates, and
checkpoints everything the step reads (all globals: weights, optimiser state, step and RNG counters)
with the position in the data, so `resume` continues exactly where the checkpoint was taken: the
final weights equal those of an uninterrupted run. Checkpoints are written atomically.

Data-parallel: when the process's communicator (ir/collectives.py; `join_world` installs MPI's under
`mpiexec -n N`) has N > 1 processes, each runs the step (compiled with `train_step{data-parallel}`)
on its contiguous share of every global batch of `batch_size` examples, drawn from the same shuffled
order on every process; the step averages the gradients, weighted by the shares, so the weights are
those one process gets with the same global batch (the last, smaller batch included). Every process
starts from rank 0's globals (after a resume: rank 0's checkpoint, broadcast), rank 0 alone prints,
writes checkpoints and the artifact, and the evaluation is split across the processes and summed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import sys
import time

import numpy as np

from mlc.ir import collectives
from mlc.ir.attributes import IntAttr, StringAttr
from mlc.ir.diagnostics import DiagnosticError, Location, error
from mlc.runtime.files import read_npz, save_npz, write_atomically

CHECKPOINT = "checkpoint.npz"
META = "__mlc_checkpoint__"


@dataclasses.dataclass
class Options:
    loss: str = "@loss"
    data: str = "digits"
    eval: str | None = None
    predict: str | None = None
    metric: str = "accuracy"
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float | None = None
    clip_norm: float = 0.0
    schedule: str = "constant"
    seed: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0  # steps; 0: at the end of each epoch only
    resume: bool = False
    plot: str | None = None
    progress: bool = True
    backend: str = "cpu"          # where the steps run: cpu or cuda
    precision: str | None = None  # bf16 / f16: products and convolutions in half precision
    sync_batch_norm: bool = True  # data-parallel: batch norm uses the global batch's statistics
    bucket_mb: float = 1.0  # data-parallel: gradients all-reduced in buckets of this size, overlapping the backward pass


def train_step_pipeline(o, steps_per_epoch: int = 1, data_parallel: bool = False) -> str:
    """The `train_step{...}` pass for these options (a cosine schedule spans the whole run)."""
    opts = [f"loss=@{o.loss.lstrip('@')}", f"optimizer={o.optimizer}", f"lr={o.lr!r}", f"momentum={o.momentum!r}",
            f"clip-norm={o.clip_norm!r}", f"schedule={o.schedule}"]
    if o.weight_decay is not None:
        opts.append(f"weight-decay={o.weight_decay!r}")
    if o.schedule == "cosine":
        opts.append(f"t-max={max(1, o.epochs * steps_per_epoch)}")
    if o.schedule == "step":
        opts.append(f"step-size={max(1, steps_per_epoch)}")
    if data_parallel:
        opts.append(f"data-parallel=true bucket-mb={o.bucket_mb!r}" + ("" if o.sync_batch_norm else " sync-batch-norm=false"))
    return "train_step{" + " ".join(opts) + "}"


# --- processes ------------------------------------------------------------------------------------------

MPI_LAUNCHERS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")  # what mpiexec sets


def launched_by_mpi() -> int:
    """The number of processes mpiexec (MPICH's Hydra, Open MPI, PMIx) started with this one; 0 when not
    started by mpiexec."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():  # (MPI_Init may have consumed the launcher's variables)
        return mpi.COMM_WORLD.Get_size()
    for name in MPI_LAUNCHERS:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


def join_world():
    """The communicator collectives run on: MPI's (mlc.distributed.init) when this process is one of
    several mpiexec started and none is installed yet, else the current one."""
    if collectives.current().size == 1 and launched_by_mpi() > 1:
        from mlc.runtime.distributed import init
        init()
    return collectives.current()


def broadcast_globals(comm, exe, root: int = 0) -> None:
    """Every process takes root's globals (weights, optimiser state, counters)."""
    for name, value in exe.globals.items():
        exe.set_global(name, comm.bcast(np.ascontiguousarray(value), root))


def _broadcast_json(comm, value, root: int = 0):
    """root's JSON-able value, on every process."""
    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    length = comm.bcast(np.array([len(data)], np.int64), root)
    data = data if comm.rank == root else np.zeros(int(length[0]), np.uint8)
    return json.loads(comm.bcast(data, root).tobytes().decode())


def _on_rank_0(comm, action, where: Location):
    """action()'s JSON-able result, computed on rank 0 and sent to every process; when it fails with a
    located error, every process raises one."""
    if comm.size == 1:
        return action()
    outcome = None
    if comm.rank == 0:
        try:
            outcome = {"value": action()}
        except DiagnosticError as e:
            _broadcast_json(comm, {"error": str(e)})
            raise
    outcome = _broadcast_json(comm, outcome)
    if "error" in outcome:
        raise error(where, f"rank 0 failed: {outcome['error']}")
    return outcome["value"]


def _check_agreement(comm, where: str, **values: int) -> None:
    """A located error on every process when the processes disagree on these integers (a different
    data file or model on some host would otherwise train on nonsense, or hang)."""
    mine = np.array(list(values.values()), np.int64)
    low, high = comm.allreduce(mine, "min"), comm.allreduce(mine, "max")
    differ = [f"{k} from {lo} to {hi}" for k, lo, hi in zip(values, low, high) if lo != hi]
    if differ:
        raise error(Location(where, 0, 0), f"the {comm.size} processes disagree ({', '.join(differ)}): "
                                           "give every process the same model, data and options")


def share(batch: np.ndarray, comm) -> np.ndarray:
    """This process's contiguous share of a global batch of example indices (shares differ by at most one)."""
    return np.array_split(batch, comm.size)[comm.rank] if comm.size > 1 else batch


# --- data -------------------------------------------------------------------------------------------------

def digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (1797 images, no download) scaled to [0, 1], with a fixed
    stratified split: a fifth of each class, picked by a seeded shuffle, is the test set."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise error(Location("digits", 0, 0), "the built-in digits set needs scikit-learn: pip install 'mlc[train]'") from None
    d = load_digits()
    rng = np.random.default_rng(0)
    test = np.zeros(len(d.target), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(d.target == c))
        test[idx[: len(idx) // 5]] = True
    pick = test if split == "test" else ~test
    return (d.data[pick] / 16.0).astype(np.float32), d.target[pick].astype(np.int64)


def load_data(spec: str, func, role: str) -> dict[str, np.ndarray]:
    """Arrays for func's arguments, by name: from an .npz, or `digits` (train split for --data, test
    split for --eval) given to the floating-point argument (reshaped to it) and the integer one."""
    from mlc.ir.interpreter import arg_names
    names, types = arg_names(func), list(func.type.inputs)
    where = Location(spec, 0, 0)
    if spec == "digits":
        images, labels = digits("test" if role == "eval" else "train")
        arrays, images_given = {}, False
        for n, t in zip(names, types):
            if t.element.is_float and not images_given:
                images_given = True
                shape = tuple(-1 if d is None else d for d in t.shape)
                try:
                    arrays[n] = images.reshape(shape).astype(t.element.np_dtype)
                except ValueError:
                    raise error(where, f"digits images are 8x8; argument %{n} of @{func.sym_name} has type {t}") from None
            elif t.element.is_int and t.rank == 1:
                arrays[n] = labels.astype(t.element.np_dtype)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise error(where, f"digits gives images and labels; @{func.sym_name} also takes {', '.join('%' + n for n in missing)}")
        return arrays
    arrays = read_npz(spec)
    missing = [n for n in names if n not in arrays]
    if missing:
        raise error(where, f"has no array for argument {', '.join('%' + n for n in missing)} of @{func.sym_name} "
                           f"(it has: {', '.join(arrays) or 'none'})")
    arrays = {n: arrays[n] for n in names}
    lengths = {a.shape[0] if a.ndim else None for a in arrays.values()}
    if len(lengths) != 1 or None in lengths:
        raise error(where, "arrays must share their first (example) dimension: " +
                    ", ".join(f"{n} {list(a.shape)}" for n, a in arrays.items()))
    return arrays


# --- checkpoints ------------------------------------------------------------------------------------------

def save_checkpoint(directory, exe, state: dict) -> None:
    arrays = {f"global/{n}": v for n, v in exe.globals.items()}
    arrays[META] = np.frombuffer(json.dumps(state).encode(), np.uint8)
    save_npz(os.path.join(directory, CHECKPOINT), arrays)


def load_checkpoint(directory, exe, fingerprint: str) -> dict | None:
    path = os.path.join(directory, CHECKPOINT)
    if not os.path.exists(path):
        return None
    arrays = read_npz(path)
    where = Location(path, 0, 0)
    try:
        state = json.loads(arrays.pop(META).tobytes().decode())
    except (KeyError, ValueError, UnicodeDecodeError):
        raise error(where, "not an mlc checkpoint (no readable state)") from None
    if state.get("fingerprint") != fingerprint:
        raise error(where, "was written for a different model or training setup (loss, optimiser, batch size, seed); "
                           "use another --checkpoint-dir, or train without --resume")
    for name, value in exe.globals.items():
        saved = arrays.get(f"global/{name}")
        if saved is None or saved.shape != value.shape or saved.dtype != value.dtype:
            raise error(where, f"damaged checkpoint: global @{name} is missing or has the wrong shape")
        exe.set_global(name, saved)
    return state


# --- the loop ---------------------------------------------------------------------------------------------

class LosslessOutput:
    """A stream whose write errors (a closed pipe, a full disk) silence it instead of ending the run:
    progress is a convenience, the trained weights are the point."""

    def __init__(self, stream):
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        self._try(lambda: self.stream.write(text))
        return len(text)

    def flush(self):
        self._try(self.stream.flush)

    def isatty(self) -> bool:
        return not self.broken and hasattr(self.stream, "isatty") and self.stream.isatty()

    def _try(self, action):
        if not self.broken:
            try:
                action()
            except (OSError, ValueError):  # (ValueError: the stream was closed)
                self.broken = True


def fit(module, o: Options, output: str | None = None, out=sys.stderr):
    """Train `module` (a Module, not modified) as `o` says; returns the executable holding the trained
    weights, saved to `output` (an artifact) when given. Progress goes to `out`; if writing it fails,
    training goes on without it."""
    from mlc.api import run_passes
    from mlc.compiler import compile
    comm = collectives.current()
    parallel = comm.size > 1
    out = LosslessOutput(out if comm.rank == 0 else io.StringIO())  # progress: once, from rank 0
    module = module.clone()
    if o.seed is not None:
        module.attributes["seed"] = IntAttr(o.seed)
    seed = module.seed
    loss_fn = module.functions.get(o.loss.lstrip("@"))
    if loss_fn is None:
        raise error(module.loc, f"no loss function {o.loss} (functions: {', '.join('@' + n for n in module.functions)})")
    data = load_data(o.data, loss_fn, "train")
    n = len(next(iter(data.values())))
    if n == 0:
        raise error(Location(o.data, 0, 0), "has no examples")
    steps_per_epoch = -(-n // o.batch_size)
    started = time.perf_counter()
    pipeline = train_step_pipeline(o, steps_per_epoch)
    # (the same for any number of processes: a checkpoint resumes with another)
    fingerprint = hashlib.sha256(json.dumps([str(module), pipeline, o.data, o.batch_size, seed]).encode()).hexdigest()
    if parallel:
        _check_agreement(comm, o.data, examples=n, setup=int(fingerprint[:15], 16), sync_batch_norm=int(o.sync_batch_norm))
        pipeline = train_step_pipeline(o, steps_per_epoch, data_parallel=True)
    run_passes(module, pipeline)
    loss_fn.attributes["sym_visibility"] = StringAttr("private")  # inlined into @train_step: no code of its own
    exe = compile(module, o.backend, precision=o.precision)
    step = exe["train_step"]
    processes = f" on {comm.size} processes ({-(-o.batch_size // comm.size)} examples or fewer each per step)" if parallel else ""
    print(f"mlc train: {n} examples, {steps_per_epoch} steps per epoch{processes}; "
          f"compiled in {time.perf_counter() - started:.1f} s", file=out)
    predict, evaluation = _evaluation(module, exe, o, loss_fn)

    state = {"fingerprint": fingerprint, "epoch": 0, "batch": 0, "losses": [], "metrics": []}
    if o.checkpoint_dir and o.resume:  # (rank 0 reads it: the other hosts need no shared file system)
        restored = _on_rank_0(comm, lambda: load_checkpoint(o.checkpoint_dir, exe, fingerprint),
                              Location(os.path.join(o.checkpoint_dir, CHECKPOINT), 0, 0))
        if restored is None:
            print(f"mlc train: no checkpoint in {o.checkpoint_dir}; starting from the beginning", file=out)
        else:
            state = restored
            print(f"mlc train: resuming at epoch {state['epoch'] + 1}, batch {state['batch']}" if state["epoch"] < o.epochs
                  else f"mlc train: the run in {o.checkpoint_dir} already finished its {o.epochs} epochs", file=out)
    if parallel:
        broadcast_globals(comm, exe)  # every process starts from rank 0's weights (or checkpoint)

    bar = _progress(o, out) if comm.rank == 0 else None
    for epoch in range(state["epoch"], o.epochs):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        first = state["batch"]
        if bar:
            bar.reset(total=steps_per_epoch)
            bar.set_description(f"epoch {epoch + 1}/{o.epochs}")
            bar.update(first)
        running, epoch_started = [], time.perf_counter()
        for b in range(first, steps_per_epoch):
            idx = share(order[b * o.batch_size: (b + 1) * o.batch_size], comm)
            loss = float(step(*(a[idx] for a in data.values())))  # (data-parallel: the global batch's)
            state["losses"].append(loss)
            running.append(loss)
            state["batch"] = b + 1
            if bar:
                bar.update(1)
                bar.set_postfix(loss=f"{np.mean(running[-20:]):.4f}", refresh=False)
            if o.checkpoint_dir and o.checkpoint_every and (b + 1) % o.checkpoint_every == 0 and b + 1 < steps_per_epoch \
                    and comm.rank == 0:
                save_checkpoint(o.checkpoint_dir, exe, state)
        state["epoch"], state["batch"] = epoch + 1, 0
        line = f"epoch {epoch + 1}/{o.epochs}: train loss {np.mean(running) if running else float('nan'):.4f}"
        if evaluation is not None:
            metrics = evaluate(exe, predict, evaluation, comm=comm)
            state["metrics"].append(metrics)
            line += f", accuracy {100 * metrics['accuracy']:.2f}%"
        line += f" ({time.perf_counter() - epoch_started:.1f} s)"
        if bar:
            bar.refresh()
            bar.write(line, file=out)
        else:
            print(line, file=out)
        if o.checkpoint_dir and comm.rank == 0:
            save_checkpoint(o.checkpoint_dir, exe, state)
    if bar:
        bar.close()
    exe.history = state
    if comm.rank != 0:
        return exe
    if output:
        exe.save(output)
    if o.plot:
        plot(state, o.plot, steps_per_epoch)
    return exe


def _progress(o, out):
    if not o.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=0, file=out, leave=False, dynamic_ncols=True, unit="step", disable=None)  # None: off when not a terminal


def _evaluation(module, exe, o, loss_fn):
    """(the predict function, the eval arrays) or (None, None)."""
    if o.eval is None:
        return None, None
    name = (o.predict or "@forward").lstrip("@")
    if name not in exe.functions:
        raise error(module.loc, f"no public function @{name} to predict with (give --predict @f)")
    predict = module.functions[name]
    arrays = load_data(o.eval, loss_fn, "eval")
    from mlc.ir.interpreter import arg_names
    unknown = [a for a in arg_names(predict) if a not in arrays]
    if unknown:
        raise error(module.loc, f"@{name} takes {', '.join('%' + a for a in unknown)}, which the loss @{loss_fn.sym_name} does not")
    if o.metric != "accuracy":
        raise error(Location("--metric", 0, 0), f"unknown metric '{o.metric}' (metrics: accuracy)")
    if not any(a.dtype.kind in "iu" for a in arrays.values()):
        raise error(Location(o.eval, 0, 0), "accuracy needs integer labels among the arrays")
    return predict, arrays


def evaluate(exe, predict, arrays: dict, batch: int = 512, comm=None) -> dict:
    """Accuracy of @predict's argmax against the integer labels of the evaluation set, in batches;
    with a communicator of several processes, each scores its share and the counts are summed (the
    same accuracy on every process)."""
    from mlc.ir.interpreter import arg_names
    labels = next(a for a in arrays.values() if a.dtype.kind in "iu")
    wanted = arg_names(predict)
    mine = share(np.arange(len(labels)), comm) if comm is not None else np.arange(len(labels))
    lo, hi = (int(mine[0]), int(mine[-1]) + 1) if len(mine) else (0, 0)
    correct = 0
    for start in range(lo, hi, batch):
        end = min(start + batch, hi)
        scores = exe[predict.sym_name](*(arrays[k][start: end] for k in wanted))
        scores = scores[0] if isinstance(scores, tuple) else scores
        correct += int((np.argmax(scores, axis=1) == labels[start: end]).sum())
    if comm is not None and comm.size > 1:
        correct = int(comm.allreduce(np.array([correct], np.int64), "sum")[0])
    return {"accuracy": correct / len(labels)}


def plot(state: dict, path: str, steps_per_epoch: int) -> None:
    """The loss per step and its per-epoch mean (and the accuracy, when evaluated), as an image."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    losses = np.array(state["losses"])
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(losses) + 1) / steps_per_epoch, losses, lw=0.6, alpha=0.5, label="loss per step")
    epochs = len(losses) // steps_per_epoch
    if epochs:
        means = losses[: epochs * steps_per_epoch].reshape(epochs, steps_per_epoch).mean(axis=1)
        ax.plot(np.arange(1, epochs + 1), means, marker="o", label="mean per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    accuracy = [m["accuracy"] for m in state["metrics"] if "accuracy" in m]
    if accuracy:
        twin = ax.twinx()
        twin.plot(np.arange(1, len(accuracy) + 1), accuracy, color="tab:green", marker="s", label="eval accuracy")
        twin.set_ylabel("eval accuracy")
    ax.legend(loc="upper right")
    fig.tight_layout()
    buf = io.BytesIO()
    ext = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        fig.savefig(buf, format=ext)
    except ValueError:
        raise error(Location(path, 0, 0), f"cannot draw a '.{ext}' image (use .png, .pdf or .svg)") from None
    finally:
        plt.close(fig)
    write_atomically(path, buf.getvalue())
