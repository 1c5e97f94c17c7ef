"""Writes a benchmark's JSON result, making its folder first, and says where.

    result_json.write(args.out, result)    # from a benchmark script (its folder is on sys.path)
"""
from __future__ import annotations

import json
import os
from typing import Any


def write(path: str, result: Any, indent: int = 2) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
    print(f"wrote {path}")
