"""The examples reach their results as a new user runs them (minutes each: MLC_RUN_SLOW=1 pytest
tests/test_examples.py). The default suite checks each model's training loop on a few steps instead
(test_models.py)."""
import re
import subprocess
import sys

import pytest

from helpers import ROOT


def run(script, *args):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def number(pattern, text):
    return float(re.search(pattern, text).group(1))


@pytest.mark.slow
@pytest.mark.parametrize("model,at_least", [("cnn", 98.0), ("lstm", 95.0), ("mlp", 96.0)])
def test_digits_classifiers(model, at_least):
    assert number(r"final test accuracy ([\d.]+)%", run("digits.py", "--model", model)) >= at_least


@pytest.mark.slow
def test_transformer_learns_to_reverse_sequences():
    assert number(r"token accuracy ([\d.]+)%", run("reverse_transformer.py")) >= 99.0


@pytest.mark.slow
def test_unet_denoises():
    out = run("denoise_unet.py")
    noisy, denoised = (float(v) for v in re.search(r"noisy ([\d.]+) dB -> denoised ([\d.]+) dB", out).groups())
    assert denoised > noisy + 4


@pytest.mark.slow
def test_gan_trains_and_saves_samples():
    out = run("digits_gan.py")
    assert "samples in" in out and (ROOT / "examples" / "digits_gan.png").exists()
