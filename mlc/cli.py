"""The `mlc` command line (SPEC §5). Bad input gets a located message and exit status 1."""
from __future__ import annotations

import argparse
import math
import os
import sys
import traceback

import numpy as np

from mlc import __version__
from mlc.ir.diagnostics import DiagnosticError, Location, error
from mlc.ir.memory import check_fits_in_memory
from mlc.runtime.files import read_array, read_npz, save_npz, write_atomically


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 1
    try:
        return args.func(args) or 0
    except DiagnosticError as e:
        print(e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mlc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # (a reader that stopped early, as `| head`: not an error; and no second one at exit)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except RecursionError:
        print(f"{getattr(args, 'file', None) or 'mlc'}: error: the input is nested too deeply", file=sys.stderr)
        return 1
    except Exception as e:  # never a bare traceback
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = getattr(args, "file", None) or "mlc"
        print(f"{where}: internal error: {type(e).__name__}: {e} (at {os.path.basename(frame.filename)}:{frame.lineno})\n"
              "This is a bug in mlc; please report it with the input that caused it.", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mlc", description="An MLIR-style compiler for neural networks.",
                                epilog="Run 'mlc COMMAND --help' for a command's options.")
    p.add_argument("--version", action="version", version=f"mlc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    i = sub.add_parser("import", help="an ONNX model as IR", description="Import FILE (.onnx) as an mlc module: @main takes the "
                       "graph's inputs and returns its outputs; initializers become (trainable) globals.")
    i.add_argument("file", metavar="FILE")
    i.add_argument("-o", "--output", metavar="OUT.ir", help="where the IR goes (default: standard output)")
    i.add_argument("--loss", choices=["cross_entropy", "mse"], help="also write @loss(inputs..., target) on @main's first output, "
                                                                   "so that 'mlc train' can fine-tune the model")
    i.set_defaults(func=cmd_import)

    v = sub.add_parser("verify", help="parse and verify an .ir file", description="Parse and verify FILE; print nothing when it is valid.")
    v.add_argument("file", metavar="FILE")
    v.set_defaults(func=cmd_verify)

    o = sub.add_parser("opt", help="run passes and print the IR (like mlir-opt)",
                       description="Run a pass pipeline over FILE and print the resulting IR.")
    o.add_argument("file", metavar="FILE", nargs="?")
    o.add_argument("--pass-pipeline", "-p", default="", metavar="PIPELINE",
                   help="comma-separated passes with options, e.g. 'inline,canonicalize{max-iterations=5},cse'")
    o.add_argument("-o", "--output", metavar="OUT", help="write the IR here instead of standard output")
    o.add_argument("--print-generic", action="store_true", help="print ops in the generic form")
    o.add_argument("--print-ir-after-all", action="store_true", help="print the IR after every pass (to stderr)")
    o.add_argument("--timing", action="store_true", help="print how long each pass took (to stderr)")
    o.add_argument("--no-verify-each", action="store_true", help="verify only at the end, not after every pass")
    o.add_argument("--list-passes", action="store_true", help="list the passes and exit")
    o.set_defaults(func=cmd_opt)

    c = sub.add_parser("compile", help="compile to a native artifact (.mlcz), or print a stage",
                       description="Compile every public function of FILE into a self-contained artifact, "
                                   "or with --emit print that stage instead.")
    c.add_argument("file", metavar="FILE")
    c.add_argument("-o", "--output", metavar="OUT", help="the artifact (default: FILE with .mlcz), or where --emit writes")
    c.add_argument("--emit", choices=["ir", "loops", "llvm", "asm", "ptx"],
                   help="ir: after the tensor-level passes; loops: the loop-level IR (with cuda: host code and kernels); "
                        "llvm: optimised LLVM IR (with cuda: the kernels' LLVM IR); asm: assembly (with cuda, as ptx: the kernels' PTX)")
    c.add_argument("--target", default="cpu", choices=["cpu", "cuda"], help="the target (cpu, or cuda: PTX kernels run through pycuda)")
    c.add_argument("--arch", default="sm_90", choices=["sm_80", "sm_90", "sm_90a"], help="the GPU architecture for --target cuda (default sm_90)")
    c.add_argument("--train", action="store_true", help="also compile @train_step: one training step of --loss (the train_step pass)")
    add_optimizer_arguments(c)
    c.set_defaults(func=cmd_compile)

    u = sub.add_parser("tune", help="measure the best tile sizes of each product and convolution on this machine",
                       description="Compile each matrix product and convolution of FILE alone with each candidate block "
                                   "of rows and slice of K, time them, and keep the best in this machine's tuning table "
                                   "(in the cache directory, $MLC_CACHE_DIR): later compiles here use it.")
    u.add_argument("file", metavar="FILE")
    u.add_argument("--batch", type=int, default=32, metavar="N", help="the size every '?' dim takes while timing (default 32)")
    u.add_argument("--train", action="store_true", help="also tune @train_step's products (the train_step pass, as compile --train)")
    add_optimizer_arguments(u)
    u.set_defaults(func=cmd_tune)

    t = sub.add_parser("train", help="train a model's trainable globals",
                       description="Train FILE's trainable globals on DATA: shuffled mini-batches through one compiled "
                                   "step (loss, gradients, optimiser), a progress bar, per-epoch evaluation and "
                                   "checkpoints that survive interruption. Under 'mpiexec -n N', data-parallel over N processes; a "
                                   "process that waits more than MLC_COLLECTIVE_TIMEOUT seconds (default 600) for the others "
                                   "ends the job.")
    t.add_argument("file", metavar="FILE")
    t.add_argument("--data", required=True, metavar="DATA",
                   help="an .npz with an array per argument of the loss (by name), or 'digits' (scikit-learn's 8x8 digits, train split)")
    t.add_argument("--eval", metavar="DATA", help="data to evaluate on after each epoch ('digits': the test split)")
    t.add_argument("--predict", metavar="@F", help="the function whose outputs --metric scores (default @forward)")
    t.add_argument("--metric", default="accuracy", choices=["accuracy"], help="accuracy: argmax of @F's output against the integer labels")
    t.add_argument("--epochs", type=int, default=10, metavar="N", help="passes over the data (default 10)")
    t.add_argument("--batch-size", type=int, default=32, metavar="B",
                   help="examples per step (default 32); under 'mpiexec -n N' the global batch, split across the N processes")
    t.add_argument("--seed", type=int, default=None, help="initialises the weights and orders the batches (default: the module's seed)")
    t.add_argument("-o", "--output", metavar="OUT.mlcz", help="the trained artifact (default: FILE with -trained.mlcz)")
    t.add_argument("--checkpoint-dir", metavar="DIR", help="write a checkpoint here after each epoch (atomically)")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS", help="also checkpoint every STEPS steps")
    t.add_argument("--resume", action="store_true", help="continue from the checkpoint in --checkpoint-dir")
    t.add_argument("--plot", metavar="LOSS.png", help="draw the loss curve (matplotlib)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--backend", default="cpu", choices=["cpu", "cuda"], help="where the steps run (default cpu)")
    t.add_argument("--precision", choices=["bf16", "f16"], help="products and convolutions in half precision (weights stay f32)")
    t.add_argument("--sync-batch-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="under 'mpiexec -n N': batch norm normalises with the global batch's statistics, as one process "
                        "would (default); --no-sync-batch-norm: with each process's own share's")
    t.add_argument("--bucket-mb", type=float, default=1.0, metavar="MB",
                   help="under 'mpiexec -n N': gradients are all-reduced in buckets of this many megabytes, each as soon "
                        "as the backward pass has computed it, overlapping the rest (default 1; 0: one bucket at the end)")
    add_optimizer_arguments(t, train=True)
    t.set_defaults(func=cmd_train)

    r = sub.add_parser("run", help="run a function", description="Run a function of FILE on inputs given as .npy files.")
    r.add_argument("file", metavar="FILE", help="an .ir file, or an artifact made by 'mlc compile' (.mlcz)")
    r.add_argument("--entry", default=None, metavar="@F", help="the function to run (default: the only or the first public one)")
    r.add_argument("--backend", default="cpu", choices=["interp", "cpu", "cuda"],
                   help="cpu (default): native code, compiled with an on-disk cache; interp: the numpy reference "
                        "interpreter; cuda: PTX kernels on the first GPU (needs pycuda: the cuda extra)")
    r.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input by argument name (x for %%x); FILE.npz alone gives every array in it by name")
    r.add_argument("--random-inputs", action="store_true", help="fill inputs not given with random values")
    r.add_argument("--profile", action="store_true", help="time each kernel (cpu backend); the table goes to standard error")
    r.add_argument("--seed", type=int, default=0, help="seed for --random-inputs (default 0)")
    r.add_argument("--dynamic-size", type=int, default=4, metavar="N", help="size of '?' dims for --random-inputs (default 4)")
    r.add_argument("-o", "--output", metavar="OUT.npz", help="save results as result0, result1, ... in an .npz")
    r.set_defaults(func=cmd_run)
    z = sub.add_parser("fuzz", help="find programs on which two configurations disagree",
                       description="Generate well-typed programs and inputs, run each under two configurations and, "
                                   "on a disagreement, write a shrunk reproducer (repro.ir + repro.npz) to --out.")
    z.add_argument("--against", default="interp", metavar="CONFIG", help="the reference configuration (default: interp)")
    z.add_argument("--backend", default="cpu", choices=["cpu", "interp"], help="the configuration under test (default: cpu)")
    z.add_argument("--pipeline", default="", metavar="PASSES", help="passes to run before the configuration under test")
    z.add_argument("--examples", type=int, default=100, metavar="N", help="how many programs (default 100)")
    z.add_argument("--out", default="mlc-fuzz", metavar="DIR", help="where a reproducer goes (default: mlc-fuzz)")
    z.add_argument("--seed", type=int, default=None, help="make the run repeatable")
    z.set_defaults(func=cmd_fuzz)
    return p


def add_optimizer_arguments(p, train=False):
    p.add_argument("--loss", default="@loss", metavar="@LOSS", help="the loss function (default @loss)")
    p.add_argument("--optimizer", default="adam", choices=["sgd", "adam", "adamw"], help="torch.optim's rules (default adam)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default 0)")
    p.add_argument("--weight-decay", type=float, default=None, help="L2 (sgd, adam) or decoupled (adamw) weight decay")
    p.add_argument("--clip-norm", type=float, default=0.0, metavar="MAX", help="clip gradients to this global norm (0: off)")
    p.add_argument("--schedule", default="constant", choices=["constant", "step", "cosine"] if train else ["constant"],
                   help="learning-rate schedule" + (" (step: x0.1 per epoch; cosine: to 0 over the run)" if train else ""))


def optimizer_options(args):
    from mlc.train import Options
    if args.lr <= 0 or args.lr != args.lr:
        raise error(Location("--lr", 0, 0), f"the learning rate must be positive, got {args.lr}")
    return Options(loss=args.loss, optimizer=args.optimizer, lr=args.lr, momentum=args.momentum,
                   weight_decay=args.weight_decay, clip_norm=args.clip_norm, schedule=args.schedule)


# --- commands -------------------------------------------------------------------------------------------

def load_module(path):
    """An .ir file, an ONNX model (.onnx), or standard input for '-' (as mlir-opt)."""
    from mlc.api import load, parse
    if path == "-":
        return parse(sys.stdin.buffer.read().decode("utf-8", errors="replace"), "<stdin>")
    if str(path).endswith(".onnx"):
        return import_onnx(path)
    return load(path)


def import_onnx(path, loss=None):
    try:
        from mlc import onnx as mlc_onnx
        return mlc_onnx.load(path, loss=loss)
    except ImportError:
        raise error(Location(str(path), 0, 0), "reading ONNX needs the onnx package (pip install 'mlc[onnx]')") from None
    except NotImplementedError as e:
        raise error(Location(str(path), 0, 0), str(e)) from None


def cmd_import(args):
    from mlc.ir.printer import print_module
    return emit_text(print_module(import_onnx(args.file, args.loss)), args.output)


def cmd_verify(args):
    from mlc.passes.memory import memory_warnings
    from mlc.ir.memory import host_memory_bytes
    for warning in memory_warnings(load_module(args.file), host_memory_bytes()):
        print(warning.render(), file=sys.stderr)
    return 0


def cmd_opt(args):
    from mlc.ir.printer import print_module
    from mlc.passes import PASSES, PassManager, PipelineError, load_passes, parse_pipeline
    from mlc.passes.manager import pipeline_error
    if args.list_passes:
        load_passes()
        for name, cls in sorted(PASSES.items()):
            opts = " ".join(f"{k}={v}" for k, v in cls.options.items())
            print(f"  {name:<14} {cls.summary}" + (f"  [{opts}]" if opts else ""))
        return 0
    if args.file is None:
        raise error(Location("mlc opt", 0, 0), "give the .ir file to optimise (or --list-passes)")
    try:
        passes = parse_pipeline(args.pass_pipeline)
    except PipelineError as e:
        raise pipeline_error(str(e)) from None
    module = load_module(args.file)
    PassManager(passes, verify_each=not args.no_verify_each, print_ir_after_all=args.print_ir_after_all,
                timing=args.timing).run(module)
    if args.no_verify_each:
        from mlc.ir.verifier import verify
        verify(module)
    return emit_text(print_module(module, generic=args.print_generic), args.output)


def emit_text(text: str, output: str | None) -> int:
    """Write to `output` atomically, or to standard output."""
    if output:
        write_atomically(output, text.encode())
    else:
        sys.stdout.write(text)
    return 0


def cmd_compile(args):
    from mlc import compiler
    from mlc.ir.printer import print_module
    from mlc.passes import PassManager
    module = load_module(args.file)
    if args.train:
        from mlc.train import train_step_pipeline
        PassManager.parse(train_step_pipeline(optimizer_options(args))).run(module)
    if args.target == "cuda" and args.emit in (None, "llvm", "asm", "ptx"):
        return compile_cuda(module, args)
    if args.emit == "ptx":
        raise error(Location("--emit", 0, 0), "ptx is what --target cuda emits; the cpu target emits llvm or asm")
    if args.emit is None:
        out = args.output or os.path.splitext(args.file)[0] + ".mlcz"
        compiler.compile(module, args.target).save(out)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.emit == "ir":
        PassManager.parse("cpu-tensor").run(module)
        text = print_module(module)
    elif args.emit == "loops":
        lowered = compiler.lower(module, args.target)
        text = memory_report(lowered) + print_module(lowered)
    else:
        exe = compiler.compile(module, args.target, cache=False)
        text = exe.jit.optimised_ir if args.emit == "llvm" else exe.jit.assembly()
    return emit_text(text, args.output)


def cmd_tune(args):
    from mlc.passes import PassManager
    from mlc.runtime import tuning
    from mlc.tune import DEFAULT, tune
    if args.batch < 1:
        raise error(Location("--batch", 0, 0), f"must be at least 1, got {args.batch}")
    module = load_module(args.file)
    if args.train:
        from mlc.train import train_step_pipeline
        PassManager.parse(train_step_pipeline(optimizer_options(args))).run(module)

    def report(t):
        choice = "default" if t.sizes == DEFAULT else f"mc={t.sizes[0]} kc={t.sizes[1] or 'auto'}"
        print(f"{t.default_ms:10.4f} ms -> {t.best_ms:10.4f} ms  {choice:<16} {t.key}", flush=True)
    if not tune(module, args.batch, report=report):
        print(f"{args.file}: nothing to tune (no f32/f64 products or convolutions)", file=sys.stderr)
        return 0
    print(f"wrote {tuning.path()}", file=sys.stderr)
    return 0


def compile_cuda(module, args):
    from mlc import compiler
    from mlc.codegen.nvptx import emit_kernels
    if args.emit is None:
        out = args.output or os.path.splitext(args.file)[0] + ".mlcz"
        try:
            compiler.compile(module, "cuda", arch=args.arch).save(out)
        except FileNotFoundError as e:  # no CUDA toolkit's libdevice here
            raise error(Location("--target", 0, 0), str(e)) from None
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.emit == "llvm":
        return emit_text(str(emit_kernels(compiler.lower(module, "cuda"))[0]), args.output)
    try:
        ptx = compiler.compile(module, "cuda", cache=False, arch=args.arch).ptx
    except FileNotFoundError as e:  # no CUDA toolkit's libdevice here
        raise error(Location("--target", 0, 0), str(e)) from None
    return emit_text(ptx, args.output)


def cmd_train(args):
    """Under `mpiexec -n N` (N > 1), trains data-parallel over the N processes (mlc/train.py); an error
    or an interrupt on one process ends them all (MPI Abort) instead of leaving them waiting for it."""
    from mlc.train import join_world, launched_by_mpi
    if launched_by_mpi() <= 1:
        return run_train(args)
    comm = join_world()
    try:
        return run_train(args)
    except BaseException as e:  # (SystemExit included: the others must not wait for a process that left)
        if isinstance(e, DiagnosticError):
            message = str(e)
        elif isinstance(e, KeyboardInterrupt):
            message = "mlc: interrupted"
        else:
            frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
            message = f"{args.file}: internal error: {type(e).__name__}: {e}" + \
                (f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame else "")
        print(f"{message}\nmlc train: process {comm.rank} of {comm.size} failed; ending the others", file=sys.stderr, flush=True)
        from mlc.runtime.distributed import abort
        abort()
        raise


def run_train(args):
    from mlc.train import fit
    o = optimizer_options(args)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            raise error(Location("--" + name.replace("_", "-"), 0, 0), f"must be at least 1, got {getattr(args, name)}")
    if args.resume and not args.checkpoint_dir:
        raise error(Location("--resume", 0, 0), "needs --checkpoint-dir (where the checkpoint is)")
    o.data, o.eval, o.predict, o.metric = args.data, args.eval, args.predict, args.metric
    o.epochs, o.batch_size, o.seed = args.epochs, args.batch_size, args.seed
    o.checkpoint_dir, o.checkpoint_every, o.resume, o.plot = args.checkpoint_dir, args.checkpoint_every, args.resume, args.plot
    o.progress = not args.quiet
    o.backend, o.precision, o.sync_batch_norm = args.backend, args.precision, args.sync_batch_norm
    if not args.bucket_mb >= 0:
        raise error(Location("--bucket-mb", 0, 0), f"must be a number of megabytes >= 0, got {args.bucket_mb:g}")
    o.bucket_mb = args.bucket_mb
    out = args.output or os.path.splitext(args.file)[0] + "-trained.mlcz"
    from mlc.ir.collectives import current
    from mlc.train import LosslessOutput
    fit(load_module(args.file), o, output=out)
    if current().rank == 0:
        print(f"wrote {out}" + (f" and {args.plot}" if args.plot else ""), file=LosslessOutput(sys.stderr))
    return 0


def memory_report(lowered) -> str:
    from mlc.passes.memory import peak_intermediate_bytes
    lines = [f"// @{name}: peak intermediate bytes {peak_intermediate_bytes(f):,} (with ? = 1), "
             f"{peak_intermediate_bytes(f, 256):,} (with ? = 256)" for name, f in lowered.functions.items()]
    return "\n".join(lines) + "\n"


def cmd_run(args):
    from mlc.ir.interpreter import Interpreter, arg_names
    exe = None
    if args.file.endswith(".mlcz"):
        from mlc.api import load_executable
        exe = load_executable(args.file)
        module = exe.module
    else:
        module = load_module(args.file)
    func = pick_entry(module, args.entry, args.file)
    if exe is not None and func.sym_name not in exe.functions:
        raise error(Location(args.file, 0, 0), f"'@{func.sym_name}' is private: the artifact has no code for it")
    inputs = gather_inputs(func, args)
    arrays = [inputs[n] for n in arg_names(func)]
    if args.backend == "interp":  # (an artifact's IR, with its weights)
        interp = Interpreter(module)
        if exe is not None:
            interp.globals.update({name: np.array(exe.globals[name]) for name in interp.globals})
        results = interp.call_public(func.sym_name, arrays)
    else:
        from mlc.compiler import compile
        from mlc.runtime.executable import profiling_at_exit
        if args.profile and args.backend != "cpu":
            raise error(Location("--profile", 0, 0), "--profile needs the cpu backend")
        if args.profile and exe is not None and not getattr(exe, "profiled", False):  # an artifact's IR, profiled, with its weights
            weights, exe = exe.globals, compile(module, "cpu", profile=True)
            for name, value in weights.items():
                exe.set_global(name, value)
        exe = exe or compile(module, args.backend, profile=True if args.profile else None)
        results = exe[func.sym_name](*arrays)
        if args.profile and not profiling_at_exit():  # (MLC_PROFILE=1 prints it at exit anyway)
            print(exe.profile(), file=sys.stderr)
    results = results if isinstance(results, tuple) else (results,)
    if args.output:
        save_npz(args.output, {f"result{i}": r for i, r in enumerate(results)})
    else:
        for i, (r, t) in enumerate(zip(results, func.type.results)):
            print(f"result{i}: {t} =")
            print(np.array2string(np.asarray(r), precision=6, threshold=200, edgeitems=4, max_line_width=100))
    return 0


def cmd_fuzz(args):
    from mlc.passes import PipelineError, parse_pipeline
    from mlc.passes.manager import pipeline_error
    from mlc.testing import fuzz
    if args.pipeline:
        try:
            parse_pipeline(args.pipeline)
        except PipelineError as e:
            raise pipeline_error(str(e)) from None
    under_test = args.backend + (":" + args.pipeline if args.pipeline else "")

    def progress(done, total):
        width = 30
        filled = width * done // max(total, 1)
        sys.stderr.write(f"\rfuzz {args.against} vs {under_test} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
        sys.stderr.flush()
    found = fuzz(args.examples, args.against, under_test, args.out, seed=args.seed, progress=progress)
    sys.stderr.write("\n")
    if found is None:
        print(f"no disagreement in {args.examples} programs")
        return 0
    print(f"disagreement: {str(found).splitlines()[0]}")
    if found.reproducer:
        print(f"reproducer: {found.reproducer[0]} with inputs {found.reproducer[1]}")
    return 1


def pick_entry(module, entry, path):
    funcs = module.functions
    where = Location(path, 0, 0)
    if entry:
        name = entry.lstrip("@")
        if name not in funcs:
            raise error(where, f"no function '@{name}' (functions: {', '.join('@' + n for n in funcs) or 'none'})")
        return funcs[name]
    public = [f for f in funcs.values() if not f.is_private]
    if not public:
        raise error(where, "the module has no public function to run")
    return public[0]


def gather_inputs(func, args) -> dict:
    from mlc.ir.interpreter import arg_names
    names = arg_names(func)
    types = dict(zip(names, func.type.inputs))
    given: dict[str, np.ndarray] = {}
    for item in args.input:
        name, eq, path = item.partition("=")
        if not eq and not item.endswith(".npz"):
            raise error(Location("--input", 0, 0), f"expected NAME=FILE.npy (or FILE.npz), got '{item}'")
        arrays = read_npz(item) if not eq else {name.strip().lstrip("%"): path}
        for name, value in arrays.items():
            if name not in types:
                raise error(Location("--input", 0, 0),
                            f"@{func.sym_name} has no argument '{name}' (arguments: {', '.join(names) or 'none'})")
            given[name] = read_array(value) if isinstance(value, str) else value
    if args.random_inputs and args.dynamic_size < 0:
        raise error(Location("--dynamic-size", 0, 0), f"must be at least 0, got {args.dynamic_size}")
    rng = np.random.default_rng(args.seed)
    inputs = {}
    for name in names:
        if name in given:
            inputs[name] = given[name]
        elif args.random_inputs:
            inputs[name] = random_input(name, types[name], rng, args.dynamic_size)
        else:
            raise error(Location("--input", 0, 0), f"missing input '{name}' ({types[name]}); give --input {name}=FILE.npy or --random-inputs")
    return inputs


def random_input(name: str, t, rng, dynamic_size: int) -> np.ndarray:
    """Normal floats; integers in [0, 2) so they are valid labels and indices for any dim >= 2."""
    shape = tuple(dynamic_size if d is None else d for d in t.shape)
    e = t.element
    drawn = t.with_shape(shape).nbytes + math.prod(shape) * 8  # (numpy draws in 64 bits first)
    check_fits_in_memory(f"random input '{name}' of shape {list(shape)}", drawn, Location("--random-inputs", 0, 0))
    if e.is_float:
        return rng.standard_normal(shape).astype(e.np_dtype)
    if e.is_bool:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(e.np_dtype)


if __name__ == "__main__":
    sys.exit(main())
