"""onnx's backend node test suite (the cases that ship with the `onnx` package) run through
mlc.onnx.backend: per op type, how many cases pass, are refused (NotImplementedError: an op,
attribute or element type mlc does not import yet) or go wrong (a wrong answer or any other
exception). The cases counted are those whose ops are all in COVERED, the ops a CNN, RNN or
Transformer export uses; `--target onnxruntime` runs the same cases on onnxruntime, for comparison.
Answers are compared with each case's tolerance, but for 16-bit float results with no tighter one
than torch.testing's for that type: a few cases ask for less than one bf16 step, which only the
reference's own order of roundings meets. As onnxruntime's runner does, a case may carry its own
tolerance (OVERRIDES), with the reason.

    python -m mlc.testing.onnx_suite [--target interp|cpu|onnxruntime]     # prints the table (markdown)
"""
from __future__ import annotations

import argparse
import collections
import warnings

import numpy as np

COVERED = frozenset("""
    Abs Acos Acosh Add And Asin Asinh Atan Atanh Ceil Cos Cosh Div Equal Erf Exp Floor Greater GreaterOrEqual IsInf
    IsNaN Less LessOrEqual Log Max Mean Min Mod Mul Neg Not Or Pow Reciprocal Round Sign Sin Sinh Sqrt Sub Sum Tan Tanh
    Xor Relu Sigmoid Elu Selu LeakyRelu PRelu HardSigmoid HardSwish Softplus Softsign ThresholdedRelu Celu Mish Gelu
    Swish Shrink Cast CastLike Clip Where MatMul Gemm Conv ConvTranspose MaxPool AveragePool GlobalAveragePool
    GlobalMaxPool BatchNormalization InstanceNormalization LayerNormalization LRN Dropout Softmax LogSoftmax Hardmax
    ReduceMean ReduceSum ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceSumSquare
    Reshape Flatten Squeeze Unsqueeze Transpose Concat Split Slice Gather GatherElements Expand Tile Pad Trilu Shape
    Size Range ConstantOfShape Constant Identity ArgMax ArgMin Einsum LSTM GRU RNN Resize TopK""".split())


HALF_TOLERANCE = {"float16": (1e-3, 1e-5), "bfloat16": (1.6e-2, 1e-5)}  # (rtol, atol), torch.testing's
OVERRIDES = {  # case: (rtol, atol), why
    # mlc sums f16 products in f32 and rounds once: 4.0e-4 from the float64 answer where the reference,
    # rounding as it goes, is 4.9e-4 from it; the two differ by 2 f16 steps.
    "test_attention_4d_causal_fp16_expanded": (2e-3, 1e-5),
}


def _close(got, want: np.ndarray, rtol: float, atol: float) -> bool:
    got = np.asarray(got)
    low_rtol, low_atol = HALF_TOLERANCE.get(want.dtype.name, (0, 0))
    return got.shape == want.shape and np.allclose(got.astype(np.float64), want.astype(np.float64), rtol=max(rtol, low_rtol),
                                                   atol=max(atol, low_atol), equal_nan=True)


def _runner(model, target: str):
    """run(list of inputs) -> outputs, for the model on `target`."""
    if target == "onnxruntime":
        import onnxruntime
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.log_severity_level = 1, 3
        session = onnxruntime.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda inputs: session.run(None, dict(zip(names, inputs)))
    from mlc import onnx as mlc_onnx
    return mlc_onnx.backend.prepare(model, target=target).run


def run_node_suite(target: str = "interp", op_types=None, per_op: int | None = None) -> dict:
    """{op type: Counter(passed=, refused=, wrong=)} over the cases whose ops are all in COVERED
    (a case's op type is its first node's; only `op_types` when given, and only the first `per_op`
    cases of each when given), and under key 'cases' what went wrong in each wrong case."""
    import onnx
    from onnx import numpy_helper
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases()
    results: dict = collections.defaultdict(collections.Counter)
    wrong = []
    for case in cases:
        nodes = case.model.graph.node
        if any(n.domain not in ("", "ai.onnx") or n.op_type not in COVERED for n in nodes):
            continue
        if op_types is not None and nodes[0].op_type not in op_types:
            continue
        counts = results[nodes[0].op_type]
        if per_op is not None and sum(counts.values()) >= per_op:
            continue
        try:
            run = _runner(case.model, target)
            for inputs, outputs in case.data_sets:
                got = run([numpy_helper.to_array(x) if isinstance(x, onnx.TensorProto) else x for x in inputs])
                for g, w in zip(got, outputs):
                    w = numpy_helper.to_array(w) if isinstance(w, onnx.TensorProto) else np.asarray(w)
                    if not _close(g, w, *OVERRIDES.get(case.name, (case.rtol, case.atol))):
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
    share = total["passed"] / max(sum(total.values()), 1)
    lines.append(f"| **all** | **{total['passed']}** ({share:.1%}) | **{total['refused']}** | **{total['wrong']}** |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="interp", choices=["interp", "cpu", "onnxruntime"])
    results = run_node_suite(ap.parse_args().target)
    print(table(results))
    for case in results["cases"]:
        print("wrong:", case)


if __name__ == "__main__":
    main()
