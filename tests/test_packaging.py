"""A real (non-editable) install of the project carries every module, under the `jengine` name only.

Editable installs and the source tree resolve folders without `__init__.py` as namespace packages,
so a missing one only shows when the project is installed the way a Docker image or a wheel does.
"""
from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE_FOLDERS = {"jengine": "jengine", "pallas_kernels": "jengine.pallas_kernels", "sharding": "jengine.sharding",
                  "server": "jengine.server"}


def source_modules() -> set[str]:
    """Every importable module name the source tree holds, as installed (`pallas_kernels/x.py` -> `jengine.pallas_kernels.x`)."""
    names = set()
    for folder, package in SOURCE_FOLDERS.items():
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, folder)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, os.path.join(ROOT, folder))
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            names.update(prefix + "." + f[:-3] if f != "__init__.py" else prefix for f in filenames if f.endswith(".py"))
    return names


def test_installed_tree_has_every_module(tmp_path):
    target = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--quiet", "--target", str(target), ROOT], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    installed = set()
    for dirpath, dirnames, filenames in os.walk(target / "jengine"):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        rel = os.path.relpath(dirpath, target)
        installed.update(rel.replace(os.sep, ".") + ("" if f == "__init__.py" else "." + f[:-3]) for f in filenames if f.endswith(".py"))
    missing = source_modules() - installed
    assert not missing, f"not installed: {sorted(missing)} (a folder without __init__.py?)"
    # Data files the code reads at run time: the native CPU kernel's source, the gRPC schema.
    for data in ("pallas_kernels/cpu_attention.cc", "server/jengine.proto"):
        assert (target / "jengine" / data).is_file(), f"not installed: {data}"
    top_level = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info")) and p.name != "bin"}
    assert top_level == {"jengine"}, f"generic top-level names in site-packages: {sorted(top_level - {'jengine'})}"
    # The installed copy imports, away from the source tree (the cwd would shadow it).
    env = dict(os.environ, PYTHONPATH=str(target))
    probe = ("import jengine.entrypoints.llm, jengine.worker.model_runner, jengine.engine.core, jengine.pallas_kernels.gpu; "
             "from jengine.pallas_kernels import cpu; assert cpu._SOURCE.is_file(); print(jengine.__file__)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(target))
