"""The user-facing differential check: mlc.testing.fuzz and `mlc fuzz` find a planted miscompile and
write a shrunk, self-contained reproducer."""
import subprocess
import sys

import numpy as np

import mlc
from mlc.passes import Pass
from mlc.testing import Disagreement, Program, check_agreement, fuzz, run_config

from helpers import FUZZ_EXAMPLES


class Sabotage(Pass):
    """A deliberately wrong pass: every mlc.add becomes mlc.sub."""
    name = "test-sabotage"

    def run(self, module):
        for op in list(module.walk()):
            if op.name == "mlc.add":
                new = mlc.ir.create_op("mlc.sub", op.operands, op.result_types, op.attributes, loc=op.loc)
                op.parent.insert_before(op, new)
                op.replace_with(new.results)


def test_fuzz_finds_a_miscompile_and_writes_a_small_reproducer(tmp_path):
    found = fuzz(200, "interp", "interp:test-sabotage", tmp_path, families=("binary", "unary"), seed=3)
    assert isinstance(found, Disagreement) and found.reproducer
    ir_path, npz_path = found.reproducer
    text = open(ir_path).read()
    assert text.startswith("// interp vs interp:test-sabotage")
    m = mlc.parse(text)
    assert len([op for op in m.walk() if op.name.startswith("mlc.")]) <= 4  # shrunk
    with np.load(npz_path) as z:
        names = [a.name_hint for a in m.functions["main"].args]
        inputs = [z[n] for n in names]
    p = Program(m, "main", inputs)
    a = run_config(m, "main", inputs, "interp")
    b = run_config(m, "main", inputs, "interp:test-sabotage")
    assert not all(np.allclose(x, y, equal_nan=True) for x, y in zip(a, b))
    try:
        check_agreement(p, "interp", "interp:test-sabotage")
        raise AssertionError("the reproducer no longer reproduces")
    except Disagreement:
        pass


def test_cli_fuzz_agrees_on_the_cpu_backend(tmp_path):
    n = FUZZ_EXAMPLES or 15
    r = subprocess.run([sys.executable, "-m", "mlc", "fuzz", "--examples", str(n), "--seed", "2", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600 + n)
    assert r.returncode == 0 and f"no disagreement in {n} programs" in r.stdout, r.stdout + r.stderr
    assert f"{n}/{n}" in r.stderr
