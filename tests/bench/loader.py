"""bench/ holds scripts, not a package: tests load its modules by path, as bench/gpu.py does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py as the module `auraserve_bench_<name>`, loaded once per process."""
    # As when a script runs: its own folder is importable (bench/server_process.py).
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    module_name = f"auraserve_bench_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module
