"""The import contract (pyproject.toml, [tool.importlinter]) holds: `lint-imports` passes.

The layers: cli on top; head, engine, worker and the tui dashboard as independent
siblings under it; core and common at the bottom. core is pure (no I/O, networking,
processes or third-party packages, and from common only config and kinds); the
dashboard imports nothing from head, engine, worker, core or cli.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_are_kept() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    assert lint_imports.exists(), f"{lint_imports} missing: install the test extra (make setup)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [str(lint_imports), "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"lint-imports failed (exit {proc.returncode}):\n{output}"
    assert "0 broken" in output, output
