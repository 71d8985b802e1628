from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_configs() -> Path:
    """The real configs in ../shared/data/configs (falls back to the package's presets copy)."""
    d = SHARED / "configs"
    if not d.is_dir():
        d = ROOT / "rust" / "kvalloc" / "presets"
    return d
