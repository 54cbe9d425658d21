"""Properties over generated programs: every pass keeps the interpreter's results, the verifier
accepts what passes produce, and damaged text only ever gives diagnostics."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

import mlc
from mlc.ir.printer import print_module
from mlc.passes import PASSES, load_passes
from mlc.testing import check_pipeline, mutations, programs

from helpers import EXAMPLES, at_fuzz_scale

load_passes()


# lower-to-loops covers part of the dialect so far; tests/test_loops.py checks it on what it supports;
# grad and train_step need a function to differentiate (tests/test_grad.py, tests/test_train_step.py);
# mixed-precision rounds products on purpose (tests/test_train_step.py checks what it computes)
@pytest.mark.parametrize("pipeline", sorted(p for p in PASSES if p not in ("lower-to-loops", "grad", "train_step", "mixed-precision")
                                            and not p.startswith("test-"))
                         + ["simplify", "inline,canonicalize,cse,dce,symbol-dce"])
@given(p=programs())
def test_pass_keeps_results(pipeline, p):
    module = check_pipeline(p, pipeline)
    text = str(module)
    assert str(mlc.parse(text)) == text


@given(p=programs(), data=st.data())
@at_fuzz_scale
def test_damaged_generated_text_gives_only_diagnostics(p, data):
    text = data.draw(mutations(p.text))
    try:
        mlc.parse(text)
    except mlc.DiagnosticError as e:
        assert e.diagnostics and all(d.line >= 0 and d.message for d in e.diagnostics)
        str(e)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
@given(data=st.data())
@at_fuzz_scale
def test_damaged_examples_give_only_diagnostics(path, data):
    base = path.read_text()
    text = data.draw(mutations(base if data.draw(st.booleans()) else print_module(mlc.parse(base), generic=True)))
    try:
        mlc.parse(text, "fuzz.ir")
    except mlc.DiagnosticError as e:
        assert e.diagnostics
        for d in e.diagnostics:
            assert d.file in ("fuzz.ir", "<string>") or d.line == 0, d


@given(st.text(max_size=200))
@at_fuzz_scale
def test_arbitrary_text_gives_only_diagnostics(text):
    try:
        mlc.parse(text)
    except mlc.DiagnosticError:
        pass
