"""mlc.passes: the pass manager, pipelines and one file per pass."""
from .manager import PASSES, Pass, PassManager, PipelineError, parse_pipeline  # noqa: F401


def load_passes():
    """Import every pass module so each registers its name (idempotent)."""
    from . import (buffer_dealloc, bufferize, canonicalize, cse, dce, decompose, expand_products, fuse, grad, inline,  # noqa: F401
                   layout, lower_to_loops, map_to_gpu, mixed_precision, overlap_collectives, reuse_buffers, scan_sums, strided_conv, symbol_dce, tile, tile_gpu, train_step, widen_half, winograd)
