"""Builds the native CPU kernels (C++ called through XLA's FFI) on first use.

A kernel's source is compiled with the host's C++ compiler (`$CXX`, else `c++`) for this CPU
(`-march=native`), against the FFI headers jaxlib ships, into `$JENGINE_CACHE_DIR/cpu_kernels`
(default `${XDG_CACHE_HOME:-~/.cache}/jengine`); the file name hashes the source, the flags, the
compiler, jaxlib's version and the CPU, so a change of any rebuilds it. `load` registers the
kernel's handler as an FFI target and returns None, or says why it could not; callers then fall
back to `jax.numpy`.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import jax

FLAGS = ("-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno")


def cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    base = os.environ.get("JENGINE_CACHE_DIR") or os.path.join(xdg, "jengine")
    return Path(base) / "cpu_kernels"


def cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++"))


def build(source: Path, cxx: str) -> Path:
    """The shared library of `source`, compiled unless a matching one is cached."""
    import jaxlib

    include = jax.ffi.include_dir()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), " ".join(FLAGS), version, jaxlib.__version__, cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [cxx, *FLAGS, f"-I{include}", str(source), "-o", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
        os.replace(tmp, target)  # atomic: concurrent builders each install a whole file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load(source: Path, targets: dict[str, str]) -> Optional[str]:
    """Builds `source` and registers each of its handlers (`{symbol: FFI target name}`) on the CPU;
    None when that worked, else the reason it did not."""
    cxx = compiler()
    if cxx is None:
        return f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    try:
        library = ctypes.cdll.LoadLibrary(str(build(source, cxx)))
    except (OSError, RuntimeError) as e:
        return f"building {source.name} failed: {e}"
    for symbol, target in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    return None
