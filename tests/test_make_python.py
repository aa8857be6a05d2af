"""Which interpreter `make` builds the venv from (the Makefile's PYTHON).

The distribution's own python3 wins where it is 3.11 or newer and has its
venv module, because it is the interpreter the compose images run and an
optimized build; anything else falls back to the first python3 on PATH, and
an explicit PYTHON always wins.  Stand-in interpreters (shell scripts that
pass or fail the Makefile's check) exercise the rule without touching the
machine's Pythons.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulations.harness import ROOT


def which_python(*args: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(["make", "-s", "--no-print-directory", "which-python", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def stand_in(tmp_path: Path, status: int) -> Path:
    """An 'interpreter' whose answer to the Makefile's check is ``status`` (0: 3.11+ with venv)."""
    path = tmp_path / "python3"
    path.write_text(f"#!/bin/sh\nexit {status}\n")
    path.chmod(0o755)
    return path


def test_the_distributions_interpreter_is_taken_when_it_passes(tmp_path: Path) -> None:
    ok = stand_in(tmp_path, 0)
    assert which_python(f"SYSTEM_PYTHON={ok}") == str(ok)


def test_one_without_venv_or_too_old_falls_back_to_python3_on_path(tmp_path: Path) -> None:
    refused = stand_in(tmp_path, 1)
    assert which_python(f"SYSTEM_PYTHON={refused}") == "python3"
    assert which_python(f"SYSTEM_PYTHON={tmp_path / 'absent'}") == "python3"


def test_an_explicit_python_wins(tmp_path: Path) -> None:
    ok = stand_in(tmp_path, 0)
    assert which_python(f"SYSTEM_PYTHON={ok}", "PYTHON=/opt/other/python3.11") == "/opt/other/python3.11"
    env = dict(os.environ, PYTHON="/opt/from/env/python3")
    assert which_python(f"SYSTEM_PYTHON={ok}", env=env) == "/opt/from/env/python3"


def test_a_real_interpreter_passes_the_check() -> None:
    """This test's own interpreter is 3.11 or newer and was able to make a venv: the check's
    version test and module list accept it (a wrong one would send every machine to python3)."""
    assert which_python(f"SYSTEM_PYTHON={sys.executable}") == sys.executable


@pytest.mark.skipif(not os.environ.get("CI"), reason="CI installs the distribution's venv module (.ci/run)")
def test_ci_runs_the_suite_on_the_distributions_interpreter() -> None:
    system = shutil.which("python3", path="/usr/bin")
    assert system is not None, "no /usr/bin/python3"
    assert which_python() == "/usr/bin/python3"
    assert Path(sys.base_prefix).resolve() == Path("/usr").resolve(), sys.base_prefix
