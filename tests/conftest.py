"""Shared test setup: tiny checkpoints on the import path and one persistent XLA cache for the run.

Engines compile every step bucket at start-up; pointing all of them at one compilation cache lets
tests that use the same tiny model and limits load those executables instead of compiling again.
"""
from __future__ import annotations

import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(__file__))

XLA_CACHE_DIR = os.path.join(tempfile.gettempdir(), "jengine-test-xla-cache")


@pytest.fixture(scope="session")
def xla_cache_dir() -> str:
    os.makedirs(XLA_CACHE_DIR, exist_ok=True)
    return XLA_CACHE_DIR
