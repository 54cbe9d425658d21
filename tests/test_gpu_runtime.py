"""GPU executables: the host code runs op by op here, the kernels on a device. Without a GPU the
device is simulated (launches on the lockstep interpreter), which tests everything but the PTX:
the host code, kernel parameters, globals kept on the device, errors from kernels. Tests marked
`cuda` run the same programs on a real GPU through pycuda and compare with the interpreter."""
import os

import numpy as np
import pytest

import mlc
from mlc import compiler
from mlc.runtime.gpu import SimulatedDevice

from helpers import EXAMPLES, ROOT


def inputs_for(func, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for t in func.type.inputs:
        shape = tuple(batch if d is None else d for d in t.shape)
        if t.element.is_float:
            out.append(rng.standard_normal(shape).astype(t.element.np_dtype))
        elif t.element.is_bool:
            out.append(np.ones(shape, bool))
        else:
            out.append(rng.integers(0, 4, shape).astype(t.element.np_dtype))
    return out


def as_list(results):
    return list(results) if isinstance(results, tuple) else [results]


def agree(m, exe, rtol=1e-4, atol=1e-5):
    for name in exe.functions:
        args = inputs_for(m.functions[name])
        want, got = as_list(mlc.interpret(m, name, *args)), as_list(exe[name](*args))
        for w, g in zip(want, got):
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"@{name}")


def only_host_code_outside_launches(module):
    """Outside the kernels: allocation, sizes and checks on them, the loops of the host."""
    for op in module.walk():
        if op.name in ("mem.load", "mem.store", "vector.load", "vector.store"):
            parent = op.parent_op
            while parent is not None and parent.name != "gpu.launch":
                parent = parent.parent_op
            assert parent is not None, f"{op.name} outside a kernel"


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_on_the_simulated_device(path):
    m = mlc.load(path)
    exe = compiler.compile(m, "cuda", device=SimulatedDevice())
    only_host_code_outside_launches(exe.lowered)
    assert len(exe.kernels) > 0
    agree(m, exe)


def test_globals_stay_on_the_device_across_training_steps():
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    mlc.run_passes(m, "train_step{loss=@loss optimizer=adam lr=0.01}")
    exe = compiler.compile(m, "cuda", device=SimulatedDevice())
    reference = mlc.ir.interpreter.Interpreter(m)
    rng = np.random.default_rng(3)
    for _ in range(3):
        x, labels = rng.standard_normal((5, 64)).astype(np.float32), rng.integers(0, 10, 5)
        np.testing.assert_allclose(exe["train_step"](x, labels), reference.call_public("train_step", (x, labels)), rtol=1e-4)
    for name in m.globals:
        np.testing.assert_allclose(exe.globals[name], reference.globals[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_a_bad_index_in_a_kernel_is_a_located_error():
    m = mlc.parse("""module { func.func @f(%x: tensor<4x3xf32>, %i: tensor<2xi64>) -> tensor<2x3xf32> {
      %y = mlc.gather %x, %i {axis = 0} : (tensor<4x3xf32>, tensor<2xi64>) -> tensor<2x3xf32>
      return %y : tensor<2x3xf32> } }""", "gather.ir")
    exe = compiler.compile(m, "cuda", device=SimulatedDevice())
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(exe["f"](x, np.array([3, 1])), x[[3, 1]])
    with pytest.raises(mlc.DiagnosticError, match=r"gather.ir:2:12: error: .* out of"):  # at the gather
        exe["f"](x, np.array([0, 4]))


def test_without_pycuda_the_kernels_compile_and_say_they_cannot_run():
    try:
        import pycuda  # noqa: F401
        pytest.skip("pycuda is installed here")
    except ImportError:
        pass
    exe = mlc.compile(mlc.load(ROOT / "examples" / "mlp.ir"), target="cuda")
    assert "forward_k0" in [k.name for k in exe.kernels.values()]
    with pytest.raises(mlc.DiagnosticError, match="cannot run them here: pycuda is not installed"):
        exe["forward"](np.zeros((2, 64), np.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_run_on_the_gpu(path):
    m = mlc.load(path)
    agree(m, mlc.compile(m, target="cuda"))


def test_jit_and_training_steps_reach_the_gpu(monkeypatch):
    """mlc.jit(backend="cuda") and compile_train_step(backend="cuda"), on the simulated device: the
    model's weights follow the device's after each step, and match the CPU's training."""
    monkeypatch.setenv("MLC_GPU_SIMULATE", "1")
    import mlc.nn as nn
    import mlc.nn.functional as F
    from mlc.optim import SGD, compile_train_step

    f = mlc.jit(lambda x, y: mlc.ops.tanh(x @ y) * 2.0, backend="cuda")
    x, y = np.random.default_rng(5).standard_normal((2, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(f(x, y), np.tanh(x @ y) * 2.0, rtol=1e-5, atol=1e-6)

    def run(backend):
        mlc.manual_seed(7)
        model = nn.Linear(4, 3)
        step = compile_train_step(model, F.mse_loss, SGD(model.parameters(), lr=0.1), backend=backend)
        rng = np.random.default_rng(8)
        losses = [float(step(rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)))
                  for _ in range(3)]
        return losses, [p.data.copy() for p in model.parameters()]
    (cpu_losses, cpu_weights), (gpu_losses, gpu_weights) = run("cpu"), run("cuda")
    np.testing.assert_allclose(gpu_losses, cpu_losses, rtol=1e-5)
    for a, b in zip(gpu_weights, cpu_weights):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gpu_artifacts_round_trip_and_refuse_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("MLC_GPU_SIMULATE", "1")
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    exe = compiler.compile(m, "cuda", cache=False)
    x = inputs_for(m.functions["forward"])[0]
    want = exe["forward"](x)
    exe.set_global("b1", np.full(32, 0.5, np.float32))  # a changed global travels in the artifact
    want = exe["forward"](x)
    exe.save(tmp_path / "m.mlcz")
    loaded = mlc.load_executable(tmp_path / "m.mlcz")
    assert type(loaded).__name__ == "GpuExecutable" and loaded.arch == "sm_90"
    np.testing.assert_allclose(loaded["forward"](x), want, rtol=1e-6)
    data = bytearray((tmp_path / "m.mlcz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.mlcz").write_bytes(bytes(data))
    with pytest.raises(mlc.DiagnosticError, match="bad.mlcz"):
        mlc.load_executable(tmp_path / "bad.mlcz")


def test_the_compile_cache_keeps_gpu_code(monkeypatch):
    from mlc.codegen.nvptx import LIBDEVICE
    if not os.path.exists(LIBDEVICE):
        pytest.skip("no libdevice here: PTX (what the cache keeps) cannot be made")
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    first = compiler.compile(m, "cuda")
    monkeypatch.setattr(compiler, "lower", lambda *a, **k: pytest.fail("lowered again instead of using the cache"))
    again = compiler.compile(m, "cuda", device=SimulatedDevice())
    assert again.ptx == first.ptx and [k.name for k in again.kernels.values()] == [k.name for k in first.kernels.values()]
    x = inputs_for(m.functions["forward"])[0]
    np.testing.assert_allclose(again["forward"](x), mlc.interpret(m, "forward", x), rtol=1e-4, atol=1e-5)


def test_training_on_the_gpu_matches_the_cpu(tmp_path, monkeypatch):
    """mlc.train.fit with backend cuda (simulated): the same losses and weights as on the CPU."""
    monkeypatch.setenv("MLC_GPU_SIMULATE", "1")
    from mlc.train import Options, fit
    rng = np.random.default_rng(9)
    np.savez(tmp_path / "d.npz", x=rng.standard_normal((24, 64)).astype(np.float32), labels=rng.integers(0, 10, 24))
    results = {}
    for backend in ("cpu", "cuda"):
        o = Options(data=str(tmp_path / "d.npz"), epochs=1, batch_size=12, progress=False, backend=backend)
        exe = fit(mlc.load(ROOT / "examples" / "mlp.ir"), o, output=str(tmp_path / f"{backend}.mlcz"))
        results[backend] = (exe.history["losses"], {n: np.asarray(v) for n, v in exe.globals.items()})
    np.testing.assert_allclose(results["cuda"][0], results["cpu"][0], rtol=1e-5)
    for name, value in results["cpu"][1].items():
        np.testing.assert_allclose(results["cuda"][1][name], value, rtol=1e-4, atol=1e-6, err_msg=name)


def test_f16_mixed_precision_uses_tensor_cores_like_the_cpu_rounds():
    m = mlc.load(ROOT / "examples" / "mlp.ir")
    exe = compiler.compile(m, "cuda", device=SimulatedDevice(), precision="f16")
    assert any(op.name == "gpu.mma_sync" for op in exe.lowered.walk())
    x = inputs_for(m.functions["forward"])[0]
    np.testing.assert_allclose(exe["forward"](x), mlc.compile(m, precision="f16")["forward"](x), rtol=2e-3, atol=2e-3)
