"""Which source a result came from: the git commit recorded in results files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

COMMIT_ENV = "E2FORMER_COMMIT"


def source_commit() -> str:
    """$E2FORMER_COMMIT when set, else the HEAD of the checkout this package runs from, else "unknown".

    The variable is for copied working trees whose git metadata lags their files (the GPU machine's
    copy of this repository), where `git rev-parse HEAD` would name an older commit.
    """
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
