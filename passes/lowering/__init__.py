"""The rules of lower-to-loops (passes/lower_to_loops.py), one module per family of ops:

  core         the driver (FunctionLowering) and its loop builders, the RULES table and @rule
  elementwise  elementwise ops, broadcast_to; constants, globals and calls (they stay tensor ops)
  fusion       the kernels the fuse pass makes
  rows         reductions, softmax, cross_entropy, topk, row kernels
  matmul       matmul (a mem.matmul where the tiled GEMM applies) and transpose
  conv         conv2d (a mem.conv2d where the tiled kernel applies), conv2d_transpose
  pool         pools and their gradients (windows: the index arithmetic they share with conv)
  shape        reshape, iota, slice, pad, concat, gather, scatter_add, and their *_elements forms
  scan         scan
  winograd     the transforms of Winograd's convolution (the winograd pass makes them)
  random       random_uniform, random_normal (Philox)
  collectives  all_reduce, broadcast, rank, world_size (in place on a copy; the runtime communicates)

Importing a family's module registers its rules; the pass imports them all.
"""
from .core import RULES, FunctionLowering, rule  # noqa: F401
