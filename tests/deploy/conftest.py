"""Fixtures for the deploy/ tests: the tools deploy/check.sh installs (the broker is shared)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
#: Where deploy/check.sh installs its tools (STREAMLSTM_DEPLOY_TOOLS moves it, as there).
TOOLS = ROOT / os.environ.get("STREAMLSTM_DEPLOY_TOOLS", "deploy/.tools")
INSTALL_HINT = "run `make deploy-check` (or `deploy/check.sh install`) first"


def tool(name: str) -> str:
    """The path of a tool deploy/check.sh installs; fails (never skips) when it is missing."""
    for candidate in (TOOLS / "bin" / name, TOOLS / "venv" / "bin" / name):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {INSTALL_HINT}")
    return found
