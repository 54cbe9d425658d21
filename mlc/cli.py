"""The `mlc` command line (SPEC §5). Bad input gets a located message and exit status 1."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback

import numpy as np

from mlc import __version__
from mlc.ir.diagnostics import DiagnosticError, Location, error


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
    except BrokenPipeError:
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
    c.add_argument("--emit", choices=["ir", "loops", "llvm", "asm"],
                   help="ir: after the tensor-level passes; loops: the loop-level IR; llvm: optimised LLVM IR; asm: assembly")
    c.add_argument("--target", default="cpu", choices=["cpu"], help="the target (cpu)")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a function", description="Run a function of FILE on inputs given as .npy files.")
    r.add_argument("file", metavar="FILE", help="an .ir file, or an artifact made by 'mlc compile' (.mlcz)")
    r.add_argument("--entry", default=None, metavar="@F", help="the function to run (default: the only or the first public one)")
    r.add_argument("--backend", default="cpu", choices=["interp", "cpu", "cuda"],
                   help="cpu (default): native code, compiled with an on-disk cache; interp: the numpy reference "
                        "interpreter (cuda arrives with its backend)")
    r.add_argument("--input", "-i", action="append", default=[], metavar="NAME=FILE.npy",
                   help="an input by argument name (x for %%x); FILE.npz alone gives every array in it by name")
    r.add_argument("--random-inputs", action="store_true", help="fill inputs not given with random values")
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


# --- commands -------------------------------------------------------------------------------------------

def load_module(path):
    """An .ir file, or standard input for '-' (as mlir-opt)."""
    from mlc.api import load, parse
    if path == "-":
        return parse(sys.stdin.buffer.read().decode("utf-8", errors="replace"), "<stdin>")
    return load(path)


def cmd_verify(args):
    load_module(args.file)
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
    from mlc.ir.printer import print_module
    from mlc.passes import PassManager
    from mlc.runtime.executable import Executable
    module = load_module(args.file)
    if args.emit is None:
        out = args.output or os.path.splitext(args.file)[0] + ".mlcz"
        Executable.build(module, args.target).save(out)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.emit == "ir":
        PassManager.parse("cpu-tensor").run(module)
        text = print_module(module)
    else:
        exe = Executable.build(module, args.target, cache=False)
        text = {"loops": lambda: memory_report(exe.lowered) + print_module(exe.lowered),
                "llvm": lambda: exe.jit.optimised_ir, "asm": exe.jit.assembly}[args.emit]()
    return emit_text(text, args.output)


def memory_report(lowered) -> str:
    from mlc.passes.lower_to_loops import peak_intermediate_bytes
    lines = [f"// @{name}: peak intermediate bytes {peak_intermediate_bytes(f):,} (with ? = 1), "
             f"{peak_intermediate_bytes(f, 256):,} (with ? = 256)" for name, f in lowered.functions.items()]
    return "\n".join(lines) + "\n"


def cmd_run(args):
    from mlc.ir.interpreter import Interpreter, arg_names
    if args.backend == "cuda":
        raise error(Location(args.file, 0, 0), "the 'cuda' backend is not available yet; use --backend cpu or interp")
    exe = None
    if args.file.endswith(".mlcz"):
        from mlc.runtime.artifact import load_executable
        exe = load_executable(args.file)
        module = exe.module
    else:
        module = load_module(args.file)
    func = pick_entry(module, args.entry, args.file)
    if exe is not None and func.sym_name not in exe.functions:
        raise error(Location(args.file, 0, 0), f"'@{func.sym_name}' is private: the artifact has no code for it")
    inputs = gather_inputs(func, args)
    arrays = [inputs[n] for n in arg_names(func)]
    if exe is not None or args.backend == "cpu":
        from mlc.runtime.executable import Executable
        exe = exe or Executable.build(module)
        results = exe[func.sym_name](*arrays)
    else:
        results = Interpreter(module).call_public(func.sym_name, arrays)
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
        arrays = read_arrays(item) if not eq else {name.strip().lstrip("%"): path}
        for name, value in arrays.items():
            if name not in types:
                raise error(Location("--input", 0, 0),
                            f"@{func.sym_name} has no argument '{name}' (arguments: {', '.join(names) or 'none'})")
            given[name] = read_array(value) if isinstance(value, str) else value
    rng = np.random.default_rng(args.seed)
    inputs = {}
    for name in names:
        if name in given:
            inputs[name] = given[name]
        elif args.random_inputs:
            inputs[name] = random_input(types[name], rng, args.dynamic_size)
        else:
            raise error(Location("--input", 0, 0), f"missing input '{name}' ({types[name]}); give --input {name}=FILE.npy or --random-inputs")
    return inputs


def random_input(t, rng, dynamic_size: int) -> np.ndarray:
    """Normal floats; integers in [0, 2) so they are valid labels and indices for any dim >= 2."""
    shape = tuple(dynamic_size if d is None else d for d in t.shape)
    e = t.element
    if e.is_float:
        return rng.standard_normal(shape).astype(e.np_dtype)
    if e.is_bool:
        return rng.integers(0, 2, shape).astype(bool)
    return rng.integers(0, 2, shape).astype(e.np_dtype)


def read_array(path: str) -> np.ndarray:
    where = Location(path, 0, 0)
    try:
        a = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise error(where, f"not a readable .npy file ({e})") from None
    if isinstance(a, np.lib.npyio.NpzFile):
        raise error(where, "is an .npz archive; give it alone as --input FILE.npz")
    return a


def read_arrays(path: str) -> dict:
    where = Location(path, 0, 0)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise error(where, "no such file") from None
    except (ValueError, OSError, EOFError, AttributeError) as e:
        raise error(where, f"not a readable .npz file ({e})") from None


def write_atomically(path: str, data: bytes):
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    except OSError as e:
        raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        os.unlink(tmp)
        raise error(Location(path, 0, 0), f"cannot write: {e.strerror}") from None


def save_npz(path: str, arrays: dict):
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomically(path, buf.getvalue())


if __name__ == "__main__":
    sys.exit(main())
