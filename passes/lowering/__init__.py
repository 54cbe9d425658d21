"""The rules of lower-to-loops (passes/lower_to_loops.py), one module per family of ops:

  core         the driver (FunctionLowering) and its loop builders, the RULES table and @rule
  elementwise  elementwise ops, broadcast_to; constants, globals and calls (they stay tensor ops)
  fusion       the kernels the fuse pass makes
  rows         reductions, softmax, cross_entropy, row kernels
  matmul       matmul and transpose
  gemm         the register-tiled GEMM and direct convolution, in loop IR
  conv         conv2d, conv2d_transpose
  pool         pools and their gradients (windows: the index arithmetic they share with conv)
  shape        reshape, iota, slice, pad, concat, gather, scatter_add
  scan         scan
  random       random_uniform, random_normal (Philox)

Importing a family's module registers its rules; the pass imports them all.
"""
from .core import RULES, FunctionLowering, rule  # noqa: F401
