"""Makes `import kvalloc` use a given build of the extension (any revision's, or an
instrumented one) with the package's Python files from this tree, so that code driving the
package (its CLI, the simulator) runs on that build. Call `install` before anything imports
kvalloc; one build per process."""

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def install(path: str) -> None:
    """Loads the extension module at `path` as `kvalloc._core` and puts the tree's `python/`
    first on the import path."""
    if "kvalloc" in sys.modules:
        raise RuntimeError("kvalloc is already imported: install a build before importing it")
    spec = importlib.util.spec_from_file_location("kvalloc._core", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"{path}: not an extension module")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kvalloc._core"] = module
    spec.loader.exec_module(module)
    sys.path.insert(0, str(ROOT / "python"))
