"""Memory and threads: compiled code reports an allocation it cannot make (a located error naming the op
and the bytes, exit status 1 from the command line, never a signal); globals are only made where they
fit; one executable serves several threads at once.

Whatever could take the machine's memory runs in a subprocess, most under an address-space limit
(RLIMIT_AS), so a regression fails the test instead of the test run.
"""
import os
import resource
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import mlc
from mlc.ir.diagnostics import Location
from mlc.passes.memory import memory_warnings
from mlc.ir.memory import check_fits_in_memory, host_memory_bytes

from helpers import ROOT

MATMUL = """module {
  func.func @f(%a: tensor<?x?xf32>, %b: tensor<?x?xf32>) -> tensor<?x?xf32> {
    %c = mlc.matmul %a, %b : (tensor<?x?xf32>, tensor<?x?xf32>) -> tensor<?x?xf32>
    return %c : tensor<?x?xf32>
  }
}
"""
STATIC_MATMUL = MATMUL.replace("tensor<?x?xf32>, tensor<?x?xf32>) -> tensor<?x?xf32>",
                               "tensor<316228x1xf32>, tensor<1x316228xf32>) -> tensor<316228x316228xf32>") \
    .replace("%a: tensor<?x?xf32>, %b: tensor<?x?xf32>) -> tensor<?x?xf32>",
             "%a: tensor<316228x1xf32>, %b: tensor<1x316228xf32>) -> tensor<316228x316228xf32>") \
    .replace("return %c : tensor<?x?xf32>", "return %c : tensor<316228x316228xf32>")
GLOBAL = """module {
  mlc.global @w : tensor<SHAPExf32> {init = "INIT"}
  func.func @f(%x: tensor<4xf32>) -> tensor<4xf32> {
    return %x : tensor<4xf32>
  }
}
"""


def run(args, address_space_gb=None):
    """A subprocess (one thread of native code) -> (exit status, stderr)."""
    def limit():
        n = address_space_gb << 30
        resource.setrlimit(resource.RLIMIT_AS, (n, n))
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       preexec_fn=limit if address_space_gb else None, env={**os.environ, "MLC_NUM_THREADS": "1"})
    return r.returncode, r.stderr


def mlc_run(tmp_path, text, a, b, **kw):
    (tmp_path / "m.ir").write_text(text)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    return run([sys.executable, "-m", "mlc", "run", tmp_path / "m.ir", "--input", f"a={tmp_path / 'a.npy'}",
                "--input", f"b={tmp_path / 'b.npy'}"], **kw)


# --- allocations in compiled code -------------------------------------------------------------------------

def test_a_result_larger_than_the_machine_is_a_located_error(tmp_path):
    n = 316228  # a 316228 x 316228 f32 product: 400 GB, from two 1.2 MB operands (limited to 64 GB on a larger machine)
    code, err = mlc_run(tmp_path, MATMUL, np.ones((n, 1), np.float32), np.ones((1, n), np.float32), address_space_gb=64)
    assert code == 1, err
    assert "m.ir:3:10: error: 'mlc.matmul': cannot allocate 400.0 GB" in err and "internal error" not in err


def test_a_failed_malloc_is_a_located_error(tmp_path):
    n = 60000  # 14.4 GB: more than an 8 GB address space, whatever the machine
    code, err = mlc_run(tmp_path, MATMUL, np.ones((n, 1), np.float32), np.ones((1, n), np.float32), address_space_gb=8)
    assert code == 1, err
    assert "'mlc.matmul': cannot allocate 14.4 GB for its result %c" in err


def test_a_size_that_wraps_64_bits_is_refused(tmp_path):
    n = 2 ** 31  # (2^31 x 0) @ (0 x 2^31): 2^62 elements of 4 bytes, 2^64 bytes, which wraps to 0
    code, err = mlc_run(tmp_path, MATMUL, np.ones((n, 0), np.float32), np.ones((0, n), np.float32))
    assert code == 1, err
    assert "'mlc.matmul': cannot allocate 18.4 EB for its result %c: more than this machine's memory" in err


def test_a_static_result_larger_than_the_machine_is_refused(tmp_path):
    (tmp_path / "m.ir").write_text(STATIC_MATMUL)
    code, err = run([sys.executable, "-m", "mlc", "run", tmp_path / "m.ir", "--random-inputs"], address_space_gb=64)
    assert code == 1, err
    assert "'mlc.matmul': cannot allocate 400.0 GB" in err


def test_the_api_raises_and_the_function_still_works():
    script = textwrap.dedent("""
        import sys, numpy as np, mlc
        exe = mlc.compile(mlc.parse(sys.argv[1], "m.ir"), cache=False)
        big = np.ones((60000, 1), np.float32), np.ones((1, 60000), np.float32)
        for _ in range(3):
            try:
                exe["f"](*big)
                raise SystemExit("no error")
            except mlc.DiagnosticError as e:
                assert "cannot allocate 14.4 GB" in str(e), e
        a, b = np.ones((3, 5), np.float32), np.ones((5, 4), np.float32)
        assert (exe["f"](a, b) == 5).all()
    """)
    code, err = run([sys.executable, "-c", script, MATMUL], address_space_gb=8)
    assert code == 0, err


# --- globals --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape, init, needs", [("100000x100000", "glorot_uniform", "40.0 GB"),
                                                 ("100000x100000", "zeros", "40.0 GB"),
                                                 ("10000000000x10000000000x10000000000", "normal", "4.0e+30 bytes")])
def test_a_global_that_does_not_fit_is_a_located_error(tmp_path, shape, init, needs):
    (tmp_path / "g.ir").write_text(GLOBAL.replace("SHAPE", shape).replace("INIT", init))
    code, err = run([sys.executable, "-m", "mlc", "compile", tmp_path / "g.ir", "-o", tmp_path / "g.mlcz"], address_space_gb=4)
    assert code == 1, err
    assert f"g.ir:2:3: error: 'mlc.global': @w needs {needs}" in err and "internal error" not in err


def test_the_interpreter_and_random_inputs_check_memory_first(tmp_path):
    """The interpreter's globals and `--random-inputs` of a huge `--dynamic-size` are located errors,
    not a bare MemoryError (or an OOM kill)."""
    (tmp_path / "g.ir").write_text(GLOBAL.replace("SHAPE", "100000x100000").replace("INIT", "glorot_uniform"))
    code, err = run([sys.executable, "-m", "mlc", "run", tmp_path / "g.ir", "--backend", "interp", "--random-inputs"],
                    address_space_gb=4)
    assert code == 1 and "g.ir:2:3: error: 'mlc.global': @w needs 40.0 GB" in err, err
    (tmp_path / "d.ir").write_text(MATMUL)
    code, err = run([sys.executable, "-m", "mlc", "run", tmp_path / "d.ir", "--backend", "interp", "--random-inputs",
                     "--dynamic-size", "10000000"])
    assert code == 1 and "--random-inputs: error: random input 'a' of shape [10000000, 10000000] needs" in err, err


def test_a_random_global_is_drawn_in_chunks():
    """400 MB of normal f32 values fit a 4 GB address space (drawn whole, their 64-bit working arrays
    took 3.3 GB more), and chunking does not change them: the first and a late stretch are those of
    the stream drawn directly."""
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import mlc
        from mlc.ir import random as rng
        from mlc.ir.interpreter import Interpreter
        w = Interpreter(mlc.parse(sys.argv[1], "g.ir")).globals["w"]
        offset, std = rng.name_offset("w"), np.sqrt(2 / 100_000_000)
        np.testing.assert_array_equal(w[:10], rng.normal((10,), 0, offset, 0.0, std))
        late = 3 * rng.CHUNK + 8
        words = rng.random_bits(8, 0, offset, late).reshape(-1, 2, 2)
        u1 = ((words[:, :, 0] >> np.uint32(8)).astype(np.float64) + 1.0) * 2.0**-24
        u2 = (words[:, :, 1] >> np.uint32(8)).astype(np.float64) * 2.0**-24
        z = np.stack([np.cos(2 * np.pi * u2), np.sin(2 * np.pi * u2)], -1) * np.sqrt(-2.0 * np.log(u1))[..., None]
        np.testing.assert_array_equal(w[late:late + 8], (std * z.reshape(-1)).astype(np.float32))
    """)
    code, err = run([sys.executable, "-c", script, GLOBAL.replace("SHAPE", "100000000").replace("INIT", "he_normal")],
                    address_space_gb=4)
    assert code == 0, err


def test_check_fits_in_memory():
    check_fits_in_memory("@small", 1000, Location("m.ir", 1, 1), "mlc.global")
    with pytest.raises(mlc.DiagnosticError, match=r"m.ir:2:3: error: 'mlc.global': @big needs .* of memory is available"):
        check_fits_in_memory("@big", 10 * host_memory_bytes(), Location("m.ir", 2, 3), "mlc.global")


def test_memory_warnings_for_what_the_machine_cannot_hold():
    text = GLOBAL.replace("SHAPE", "100000x100000").replace("INIT", "zeros")
    warnings = [d.render().splitlines()[0] for d in memory_warnings(mlc.parse(text, "g.ir"), 16 * 10 ** 9)]
    assert warnings == ["g.ir:2:3: warning: 'mlc.global': @w takes 40.0 GB, more than the 16.0 GB of memory here"]
    warnings = [d.render().splitlines()[0] for d in memory_warnings(mlc.parse(STATIC_MATMUL, "m.ir"), 16 * 10 ** 9)]
    assert warnings == ["m.ir:3:10: warning: 'mlc.matmul': its result %c takes 400.0 GB, more than the 16.0 GB of memory here"]
    assert memory_warnings(mlc.parse(MATMUL), 16 * 10 ** 9) == []


# --- threads ----------------------------------------------------------------------------------------------

N = 1 << 18  # large enough for the update's loop to run on the thread pool (the GIL changes hands mid-call)
THREADED = (ROOT / "examples" / "mlp.ir").read_text().replace("module @mlp {", f"""module @mlp {{
  mlc.global @total : tensor<{N}xf32> {{init = "zeros"}}
  func.func @accumulate(%x: tensor<{N}xf32>) -> tensor<f32> {{
    %t = mlc.global_load @total : tensor<{N}xf32>
    %n = mlc.add %t, %x
    mlc.global_store @total, %n : tensor<{N}xf32>
    %s = mlc.reduce_sum %n : (tensor<{N}xf32>) -> tensor<f32>
    return %s : tensor<f32>
  }}
  func.func @fill(%x: tensor<{N}xf32>) {{
    mlc.global_store @total, %x : tensor<{N}xf32>
    return
  }}
  func.func @read() -> tensor<{N}xf32> {{
    %t = mlc.global_load @total : tensor<{N}xf32>
    return %t : tensor<{N}xf32>
  }}
""")


def hammer(work, threads=8):
    errors = []

    def guarded(k):
        try:
            work(k)
        except Exception as e:  # (reported by the test, not lost in the thread)
            errors.append(e)
    pool = [threading.Thread(target=guarded, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]


def test_threads_share_an_executable():
    module = mlc.parse(THREADED)
    exe = mlc.compile(module, cache=False)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((int(rng.integers(1, 400)), 64)).astype(np.float32) for _ in range(8)]
    want = [mlc.interpret(module, "forward", x) for x in xs]
    ones = np.ones(N, np.float32)

    def work(k):
        for _ in range(50):
            np.testing.assert_allclose(exe["forward"](xs[k]), want[k], rtol=1e-4, atol=1e-5)
            exe["accumulate"](ones)
    hammer(work)
    assert (exe.globals["total"] == 8 * 50).all()  # no update lost


def test_a_reader_sees_a_global_whole():
    exe = mlc.compile(mlc.parse(THREADED), cache=False)

    def work(k):
        for i in range(50):
            if k % 2:
                exe["fill"](np.full(N, k * 100 + i, np.float32))
            else:
                seen = exe["read"]()
                assert seen.min() == seen.max(), "a read saw a store half done"
    hammer(work)
