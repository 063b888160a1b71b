"""Running the project's scripts and launchers as real child processes."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def python_env() -> dict[str, str]:
    """Environment for child processes: this one, with the repo importable. Launchers are started as
    ``sys.executable -m ...``, so PATH stays as it is (and so does the ninja that builds LAMB's CPU kernel)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env
