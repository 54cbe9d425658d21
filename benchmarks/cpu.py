"""The CPU backend against numpy and torch, measured side by side in one run; prints one table.

    python benchmarks/cpu.py [--quick]

Each figure is the best of a few runs (this machine is noisy); ratios > 1 mean mlc is faster.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import mlc


def best(fn, repeat=3):
    fn()  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def compile_one(text):
    t0 = time.perf_counter()
    exe = mlc.compile(mlc.parse(text))
    return exe, time.perf_counter() - t0


def sgemm(n):
    text = f"""module {{ func.func @f(%a: tensor<{n}x{n}xf32>, %b: tensor<{n}x{n}xf32>) -> tensor<{n}x{n}xf32> {{
      %c = mlc.matmul %a, %b
      return %c : tensor<{n}x{n}xf32> }} }}"""
    exe, _ = compile_one(text)
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    t_mlc, t_np = best(lambda: exe["f"](a, b), 1 if n >= 1024 else 3), best(lambda: a @ b)
    flops = 2 * n ** 3
    return f"SGEMM {n}", t_mlc, t_np, "numpy", f"{flops / t_mlc / 1e9:.1f} vs {flops / t_np / 1e9:.1f} GFLOP/s"


def elementwise(n):
    text = f"""module {{ func.func @f(%x: tensor<{n}xf32>) -> tensor<{n}xf32> {{
      %half = mlc.constant dense<0.5> : tensor<f32>
      %one = mlc.constant dense<1.0> : tensor<f32>
      %a = mlc.mul %x, %half
      %b = mlc.add %a, %one
      %r = mlc.relu %b
      %t = mlc.tanh %x
      %y = mlc.mul %r, %t
      return %y : tensor<{n}xf32> }} }}"""
    exe, _ = compile_one(text)
    x = np.random.randn(n).astype(np.float32)

    def numpy_chain():
        return np.maximum(x * np.float32(0.5) + np.float32(1), 0) * np.tanh(x)
    return "relu(x*0.5+1)*tanh(x), 16M f32", best(lambda: exe["f"](x)), best(numpy_chain), "numpy", ""


def softmax():
    text = """module { func.func @f(%x: tensor<4096x1024xf32>) -> tensor<4096x1024xf32> {
      %y = mlc.softmax %x {axis = 1}
      return %y : tensor<4096x1024xf32> } }"""
    exe, _ = compile_one(text)
    x = np.random.randn(4096, 1024).astype(np.float32)

    def numpy_softmax():
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return "row softmax 4096x1024", best(lambda: exe["f"](x)), best(numpy_softmax), "numpy", ""


def conv(torch):
    text = """module { func.func @f(%x: tensor<8x64x56x56xf32>, %w: tensor<64x64x3x3xf32>) -> tensor<8x64x56x56xf32> {
      %y = mlc.conv2d %x, %w {padding = [1, 1, 1, 1]}
      return %y : tensor<8x64x56x56xf32> } }"""
    exe, _ = compile_one(text)
    x, w = np.random.randn(8, 64, 56, 56).astype(np.float32), np.random.randn(64, 64, 3, 3).astype(np.float32)
    tx, tw = torch.from_numpy(x), torch.from_numpy(w)
    return ("conv2d 3x3 64->64 56x56 b8", best(lambda: exe["f"](x, w), 1),
            best(lambda: torch.nn.functional.conv2d(tx, tw, padding=1)), "torch", "")


MLP = """module @mlp {
  mlc.global @w1 : tensor<784x1024xf32> {init = "glorot_uniform"}
  mlc.global @b1 : tensor<1024xf32> {init = "zeros"}
  mlc.global @w2 : tensor<1024x1024xf32> {init = "glorot_uniform"}
  mlc.global @b2 : tensor<1024xf32> {init = "zeros"}
  mlc.global @w3 : tensor<1024x10xf32> {init = "glorot_uniform"}
  func.func @forward(%x: tensor<?x784xf32>) -> tensor<?x10xf32> {
    %w1 = mlc.global_load @w1 : tensor<784x1024xf32>
    %b1 = mlc.global_load @b1 : tensor<1024xf32>
    %w2 = mlc.global_load @w2 : tensor<1024x1024xf32>
    %b2 = mlc.global_load @b2 : tensor<1024xf32>
    %w3 = mlc.global_load @w3 : tensor<1024x10xf32>
    %h1 = mlc.matmul %x, %w1 : (tensor<?x784xf32>, tensor<784x1024xf32>) -> tensor<?x1024xf32>
    %a1 = mlc.add %h1, %b1 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %r1 = mlc.relu %a1
    %h2 = mlc.matmul %r1, %w2 : (tensor<?x1024xf32>, tensor<1024x1024xf32>) -> tensor<?x1024xf32>
    %a2 = mlc.add %h2, %b2 : (tensor<?x1024xf32>, tensor<1024xf32>) -> tensor<?x1024xf32>
    %r2 = mlc.relu %a2
    %y = mlc.matmul %r2, %w3 : (tensor<?x1024xf32>, tensor<1024x10xf32>) -> tensor<?x10xf32>
    return %y : tensor<?x10xf32>
  }
}"""


def mlp(torch, batch):
    exe, _ = compile_one(MLP)
    g = exe.globals
    x = np.random.randn(batch, 784).astype(np.float32)
    net = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                              torch.nn.Linear(1024, 10, bias=False))
    with torch.no_grad():
        for layer, w, b in ((net[0], g["w1"], g["b1"]), (net[2], g["w2"], g["b2"]), (net[4], g["w3"], None)):
            layer.weight.copy_(torch.from_numpy(w.T))
            if b is not None:
                layer.bias.copy_(torch.from_numpy(b))
    tx = torch.from_numpy(x)
    np.testing.assert_allclose(exe["forward"](x), net(tx).detach().numpy(), rtol=1e-3, atol=1e-3)

    def torch_forward():
        with torch.no_grad():
            return net(tx)
    repeat = 1 if batch > 16 else 20
    return f"MLP 784-1024-1024-10 b{batch}", best(lambda: exe["forward"](x), repeat), best(torch_forward, repeat), "torch", ""


def layer_norm(torch):
    text = """module { func.func @f(%x: tensor<4096x1024xf32>, %g: tensor<1024xf32>, %b: tensor<1024xf32>) -> tensor<4096x1024xf32> {
      %eps = mlc.constant dense<1.0e-5> : tensor<f32>
      %m = mlc.reduce_mean %x {axes = [1], keepdims = true}
      %d = mlc.sub %x, %m
      %sq = mlc.mul %d, %d
      %v = mlc.reduce_mean %sq {axes = [1], keepdims = true}
      %ve = mlc.add %v, %eps
      %rs = mlc.rsqrt %ve
      %n = mlc.mul %d, %rs
      %s = mlc.mul %n, %g
      %y = mlc.add %s, %b
      return %y : tensor<4096x1024xf32> } }"""
    exe, _ = compile_one(text)
    x, g, b = np.random.randn(4096, 1024).astype(np.float32), np.random.rand(1024).astype(np.float32), np.random.rand(1024).astype(np.float32)
    tx, tg, tb = torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(b)
    np.testing.assert_allclose(exe["f"](x, g, b), torch.nn.functional.layer_norm(tx, (1024,), tg, tb).numpy(), rtol=1e-4, atol=1e-4)
    return ("layer norm (as ops) 4096x1024", best(lambda: exe["f"](x, g, b)),
            best(lambda: torch.nn.functional.layer_norm(tx, (1024,), tg, tb)), "torch", "")


def compile_times():
    module = mlc.parse(MLP)
    t0 = time.perf_counter()
    mlc.compile(module, cache=False)
    cold = time.perf_counter() - t0
    mlc.compile(module)  # fill the cache
    t0 = time.perf_counter()
    mlc.compile(module)
    warm = time.perf_counter() - t0
    return [("compile MLP, cold", cold, None, "", ""), ("compile MLP, from the cache", warm, None, "", "")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller problems")
    args = ap.parse_args()
    import os
    import tempfile
    import torch
    torch.set_num_threads(2)
    os.environ.setdefault("MLC_CACHE_DIR", tempfile.mkdtemp(prefix="mlc-bench-cache-"))
    rows = [sgemm(256), sgemm(512)] + ([] if args.quick else [sgemm(1024)])
    rows += [elementwise(1 << 20 if args.quick else 1 << 24), softmax(), layer_norm(torch), mlp(torch, 256), mlp(torch, 1)]
    if not args.quick:
        rows.append(conv(torch))
    rows += compile_times()
    print(f"{'benchmark':<36}{'mlc (ms)':>11}{'peer (ms)':>11}  {'peer':<6}{'mlc/peer speed':>15}  notes")
    for name, t, peer, who, note in rows:
        ratio = f"{peer / t:.2f}x" if peer else ""
        peer_ms = f"{peer * 1e3:.1f}" if peer else ""
        print(f"{name:<36}{t * 1e3:>11.1f}{peer_ms:>11}  {who:<6}{ratio:>15}  {note}")


if __name__ == "__main__":
    main()
