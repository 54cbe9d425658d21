"""Named pipelines: the compiler's plan, visible in one place. The names work wherever a pipeline
string does (`mlc opt --pass-pipeline=cpu`, `PassManager.parse`), and may name each other."""

PIPELINES = {
    # tensor-level clean-up every backend starts from
    "simplify": "inline,symbol-dce,canonicalize,cse,canonicalize",
    # the CPU backend's tensor-level stage (`mlc compile --emit ir` shows its result)
    "cpu-tensor": "inline,decompose,strided-conv,winograd,symbol-dce,canonicalize,cse,scan-sums,canonicalize,cse,layout,widen-half,fuse",
    # then loop nests over buffers, freed buffers handed on, all-reduces overlapping the kernels after them
    # (`--emit loops`); codegen/llvm.py takes it from there
    "cpu": "cpu-tensor,bufferize,lower-to-loops,tile,buffer-dealloc,canonicalize,cse,reuse-buffers,overlap-collectives",
    # the GPU backend: the same loop nests; products as tiled kernels (or plain loops), the other nests
    # a thread per iteration; codegen/nvptx.py makes PTX of each launch and the host code runs around them
    "cuda": "cpu-tensor{tensor-cores=1,output-tile=0},bufferize,lower-to-loops,tile-gpu,expand-products,map-to-gpu,buffer-dealloc,canonicalize,cse",
}
