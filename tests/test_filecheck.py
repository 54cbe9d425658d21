"""Runs the FileCheck tests in tests/filecheck: each `// RUN:` line is a shell pipeline where %s is the
file. `mlc` and `filecheck` are the installed commands; `not` inverts an exit status."""
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent / "filecheck"
FILES = sorted(HERE.glob("*.ir"))


def run_lines(path):
    return [m.group(1) for m in re.finditer(r"^// RUN: (.*)$", path.read_text(), re.M)]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_filecheck(path, tmp_path):
    assert shutil.which("filecheck"), "filecheck is not installed (pip install '.[test]')"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "not").write_text("#!/bin/sh\n\"$@\"\n[ $? -ne 0 ]\n")
    (bindir / "not").chmod(0o755)
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    lines = run_lines(path)
    assert lines, f"{path.name} has no RUN line"
    for line in lines:
        cmd = line.replace("%s", str(path))
        r = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 0, f"RUN: {cmd}\n{r.stdout}\n{r.stderr}"
