"""Code generation (LLVM, CUDA) — arrives with the CPU backend issue."""
