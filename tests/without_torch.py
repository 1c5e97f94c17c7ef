"""Runs `jengine ARGS...` in a process where torch cannot be found, as on a machine without it.

    python tests/without_torch.py generate --prompt ...

The path finder answers "no such module" for `torch` and its submodules, so availability checks
(`importlib.util.find_spec`) report it missing exactly as on a fresh machine, and any `import torch`
on the serving path raises ModuleNotFoundError and fails the command. Used by tests/test_gguf.py.
"""
from __future__ import annotations

import importlib.machinery
import sys

_find_spec = importlib.machinery.PathFinder.find_spec


def _hide_torch(name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
        return None
    return _find_spec(name, path, target)


importlib.machinery.PathFinder.find_spec = _hide_torch  # type: ignore[method-assign]
sys.modules.pop("torch", None)

if __name__ == "__main__":
    from jengine.cli import main

    code = main(sys.argv[1:])
    assert "torch" not in sys.modules, "torch was imported"
    sys.exit(code)
