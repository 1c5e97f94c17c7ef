"""The `jengine` command line: generate and bench on a tiny checkpoint, and flag validation."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tiny_models import make_tiny_checkpoint

LIMITS = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32"]


def jengine(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jengine.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "llama")


def test_generate_prints_the_completion(tiny, xla_cache_dir):
    from jengine import LLM, SamplingParams

    res = jengine("generate", tiny, *LIMITS, "--compilation-cache-dir", xla_cache_dir, "--no-chat", "--prompt", "Hello world", "--max-tokens", "5")
    assert res.returncode == 0, res.stderr
    llm = LLM(tiny, compilation_cache_dir=xla_cache_dir, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
    expected = llm.generate("Hello world", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].outputs[0].text
    assert res.stdout.rstrip("\n") == expected


def test_bench_reports_throughput(tiny, xla_cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = jengine("bench", tiny, *LIMITS, "--compilation-cache-dir", xla_cache_dir, "--num-prompts", "6", "--input-len", "4:40", "--output-len", "2:9", "--output-json", str(out))
    assert res.returncode == 0, res.stderr
    assert "output tokens/s" in res.stdout
    result = json.loads(out.read_text())
    assert result["num_requests"] == 6 and result["compilations_after_warmup"] == 0
    assert 6 * 2 <= result["output_tokens"] <= 6 * 9


@pytest.mark.parametrize("args, message", [
    (["--max-num-seqs", "0"], "max-num-seqs"),
    (["--dtype", "int3"], "dtype"),
    (["--block-size", "7"], "block-size"),
])
def test_invalid_flags_fail_at_start(args, message):
    res = jengine("generate", *args, timeout=60)
    assert res.returncode != 0 and message in res.stderr
