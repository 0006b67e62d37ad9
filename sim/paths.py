"""Where project files live: paths in configs are relative to the project root.

Hydra may run an app from any directory; `project_path` resolves a relative path from a
config against the current directory first and the project root second, so that
`conf/...` and `profiles/...` work from anywhere.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def project_path(path: str | Path) -> Path:
    """Absolute path for `path`: as given if absolute or present from the cwd, else under the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p.resolve()
    return PROJECT_ROOT / p
