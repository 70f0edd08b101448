import shutil
import subprocess
from pathlib import Path

import pytest

from e2former_calc.provenance import COMMIT_ENV, source_commit


def test_the_environment_variable_names_the_commit(monkeypatch):
    monkeypatch.setenv(COMMIT_ENV, "543b315")
    assert source_commit() == "543b315"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_without_the_variable_the_checkout_head(monkeypatch):
    monkeypatch.delenv(COMMIT_ENV, raising=False)
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=root)
    assert source_commit() == (head.stdout.strip() if head.returncode == 0 else "unknown")
