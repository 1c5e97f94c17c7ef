"""Benchmark sides run each in a fresh process (two engines or thread pools in one process distort each
other on a small machine): the child prints one `RESULT <json>` line, the parent reads it back.

    side_process.emit(result)         # in the child
    result = side_process.run(cmd)    # in the parent; exits with the child's output when it failed
"""
from __future__ import annotations

import json
import subprocess
from typing import Any

PREFIX = "RESULT "


def emit(result: Any) -> None:
    """Prints the child's result for `run` to find."""
    print(PREFIX + json.dumps(result), flush=True)


def run(cmd: list[str]) -> Any:
    """Runs `cmd` and returns its last `RESULT` line's value; a child that fails or prints none ends
    the benchmark (exit status 1) with the tail of its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{' '.join(cmd[1:])} failed (exit status {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix(PREFIX))
