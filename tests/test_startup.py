"""Start-up: progress lines, and serving while step buckets compile in the background (never on a step)."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from tiny_models import make_tiny_checkpoint

LIMITS = dict(max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64)


# ----- PieceCompiler (fake pieces: no JAX) -------------------------------------------------------
class _Lowered:
    def __init__(self, log: list, key: str, gate: threading.Event | None = None, fail: bool = False) -> None:
        self.log, self.key, self.gate, self.fail = log, key, gate, fail

    def compile(self) -> None:
        if self.gate is not None:
            assert self.gate.wait(10)
        if self.fail:
            raise ValueError("boom")
        self.log.append(self.key)


def test_piece_compiler_compiles_in_order_and_a_waiter_jumps_the_queue():
    from jengine.worker.warmup import PieceCompiler

    log: list = []
    gate = threading.Event()
    keys = [f"p{i}" for i in range(8)]
    pieces = [(k, (lambda k=k: _Lowered(log, k, gate if k == "p0" else None))) for k in keys]
    compiler = PieceCompiler(pieces, workers=1)  # p0 blocks the only worker until the gate opens
    time.sleep(0.05)
    waiter = threading.Thread(target=compiler.wait, args=(["p6"],))
    waiter.start()
    time.sleep(0.05)
    assert not compiler.ready(["p6"]) and waiter.is_alive()
    gate.set()
    waiter.join(10)
    compiler.wait_all()
    assert log[:2] == ["p0", "p6"] and sorted(log) == keys and compiler.all_done


def test_piece_compiler_reports_a_failed_piece_to_its_waiter_and_stop_drops_the_queue():
    from jengine.worker.warmup import PieceCompiler

    log: list = []
    compiler = PieceCompiler([("bad", lambda: _Lowered(log, "bad", fail=True)), ("ok", lambda: _Lowered(log, "ok"))], workers=2)
    with pytest.raises(RuntimeError, match="bad"):
        compiler.wait(["bad"])
    compiler.wait(["ok"])
    with pytest.raises(KeyError):
        compiler.wait(["nope"])
    gate = threading.Event()
    slow = PieceCompiler([(i, (lambda i=i: _Lowered(log, i, gate))) for i in range(20)], workers=1)
    threading.Timer(0.1, gate.set).start()
    slow.stop()
    assert not slow.all_done and sum(isinstance(k, int) for k in log) <= 1


def test_progress_log_lines_say_done_total_elapsed_and_estimate(caplog):
    from jengine.progress import ProgressLog

    logger = logging.getLogger("jengine.test_progress")
    with caplog.at_level(logging.INFO, logger="jengine.test_progress"):
        p = ProgressLog(logger, "compiling step pieces", 4, "pieces", interval=3600)
        for _ in range(4):
            p.advance()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("compiling step pieces: 1/4 pieces (25%), ") and "s left" in lines[0]
    assert lines[-1].startswith("compiling step pieces: 4/4 pieces (100%), ") and "left" not in lines[-1]
    assert len(lines) == 2  # the interval holds back the ones between


# ----- the engine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("startup"), "llama")


def test_engine_logs_weight_loading_and_compile_progress(tiny, xla_cache_dir, caplog):
    from jengine import LLM

    with caplog.at_level(logging.INFO, logger="jengine"):
        LLM(tiny, compilation_cache_dir=xla_cache_dir, **LIMITS)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "loading weights: " in text and "tensors (100%)" in text
    assert "compiling step pieces: " in text and "pieces (100%)" in text


def test_a_step_waits_for_its_bucket_compiling_in_the_background(tiny, xla_cache_dir, monkeypatch):
    """The first pieces compile before the engine starts; a prompt needing a bigger bucket waits for it
    (counted), output matches an engine compiled up front, and nothing compiles on a step."""
    from jengine import LLM, SamplingParams
    from jengine.worker.model_runner import ModelRunner

    gate = threading.Event()
    original = ModelRunner._warmup_pieces

    def gated(self):  # hold every piece past the first ones until the test opens the gate
        first = set(self.first_pieces())

        def hold(lower):
            def lowered():
                assert gate.wait(60)
                return lower()
            return lowered

        return [(k, f if k in first else hold(f)) for k, f in original(self)]

    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    long_prompt = {"prompt_token_ids": [5 + i % 50 for i in range(60)]}  # 60 tokens: the 64-token bucket
    expected = LLM(tiny, compilation_cache_dir=xla_cache_dir, **LIMITS).generate(long_prompt, params, use_tqdm=False)[0].outputs[0].token_ids

    original_first = ModelRunner.first_pieces
    monkeypatch.setattr(ModelRunner, "first_pieces", lambda self: original_first(self)[:1] + original_first(self)[-1:])  # smallest bucket only
    monkeypatch.setattr(ModelRunner, "_warmup_pieces", gated)
    llm = LLM(tiny, compilation_cache_dir=xla_cache_dir, compile_in_background=True, **LIMITS)
    runner = llm.engine.runner
    assert not runner._compiler.all_done and len(runner.first_pieces()) == 2
    threading.Timer(0.5, gate.set).start()
    got = llm.generate(long_prompt, params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == expected
    assert runner.bucket_waits >= 1 and runner.bucket_wait_seconds > 0.2
    assert llm.engine.compilations_after_warmup == 0
    runner._compiler.wait_all()
    llm.engine.shutdown()
