"""onnx's backend node test suite (the cases that ship with the `onnx` package) run through
mlc.onnx: per op type, how many cases pass, are refused (NotImplementedError: an op, attribute or
element type mlc does not import yet) or go wrong (a wrong answer or any other exception).

    python -m mlc.testing.onnx_suite [--target cpu]     # prints the table (markdown)
"""
from __future__ import annotations

import argparse
import collections
import warnings

import numpy as np


def run_node_suite(target: str = "interp", op_types=None) -> dict:
    """{op type: Counter(passed=, refused=, wrong=)} over the cases whose ops all have converters
    (a case's op type is its first node's; only `op_types` when given), and under key 'cases' what
    went wrong in each wrong case."""
    import onnx
    from onnx import numpy_helper
    from onnx.backend.test.case.node import collect_testcases

    import mlc
    from mlc import onnx as mlc_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    results: dict = collections.defaultdict(collections.Counter)
    wrong = []
    for case in cases:
        nodes = case.model.graph.node
        if any(n.domain not in ("", "ai.onnx") or n.op_type not in mlc_onnx.CONVERTERS for n in nodes):
            continue
        if op_types is not None and nodes[0].op_type not in op_types:
            continue
        counts = results[nodes[0].op_type]
        try:
            m = mlc_onnx.load(case.model)
            run = (lambda *xs: mlc.interpret(m, "main", *xs)) if target == "interp" else mlc.compile(m, target)["main"]
            for inputs, outputs in case.data_sets:
                inputs = [numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in inputs]
                got = run(*inputs)
                for g, w in zip(got if isinstance(got, tuple) else [got], outputs):
                    w = numpy_helper.to_array(w) if isinstance(w, onnx.TensorProto) else np.asarray(w)
                    if g.shape != w.shape or not np.allclose(g.astype(np.float64), w.astype(np.float64), rtol=case.rtol,
                                                             atol=case.atol, equal_nan=True):
                        raise AssertionError(f"{case.name}: a wrong answer")
        except NotImplementedError:
            counts["refused"] += 1
        except Exception as e:  # noqa: BLE001  (any other outcome is a defect to report)
            counts["wrong"] += 1
            wrong.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        else:
            counts["passed"] += 1
    results["cases"] = wrong
    return results


def table(results: dict) -> str:
    rows = sorted((op, c) for op, c in results.items() if op != "cases")
    total = collections.Counter()
    lines = ["| op type | pass | refused | wrong |", "| --- | --- | --- | --- |"]
    for op, c in rows:
        total.update(c)
        lines.append(f"| {op} | {c['passed']} | {c['refused']} | {c['wrong']} |")
    lines.append(f"| **all** | **{total['passed']}** | **{total['refused']}** | **{total['wrong']}** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="interp", choices=["interp", "cpu"])
    results = run_node_suite(ap.parse_args().target)
    print(table(results))
    for case in results["cases"]:
        print("wrong:", case)


if __name__ == "__main__":
    main()
