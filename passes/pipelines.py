"""Named pipelines: the compiler's plan, visible in one place. Names work in `--pass-pipeline`."""

PIPELINES = {
    # tensor-level clean-up every backend starts from
    "simplify": "inline,symbol-dce,canonicalize,cse,canonicalize",
}


def expand(pipeline: str) -> str:
    """Replace a named pipeline by its passes."""
    return ",".join(PIPELINES.get(part.strip(), part.strip()) for part in pipeline.split(",")) \
        if "{" not in pipeline else pipeline
