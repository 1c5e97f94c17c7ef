"""The `jengine` command line: generate and bench on a tiny checkpoint, and flag validation."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from tiny_models import make_tiny_checkpoint

LIMITS = ["--max-model-len", "128", "--max-num-seqs", "4", "--max-num-batched-tokens", "32"]


def jengine_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jengine.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cli"), "llama")


def test_generate_prints_the_completion(tiny, xla_cache_dir):
    from jengine import LLM, SamplingParams

    res = jengine_cli("generate", tiny, *LIMITS, "--compilation-cache-dir", xla_cache_dir, "--no-chat", "--prompt", "Hello world", "--max-tokens", "5")
    assert res.returncode == 0, res.stderr
    llm = LLM(tiny, compilation_cache_dir=xla_cache_dir, max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
    expected = llm.generate("Hello world", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)[0].outputs[0].text
    assert res.stdout.rstrip("\n") == expected


def test_bench_reports_throughput(tiny, xla_cache_dir, tmp_path):
    out = tmp_path / "bench.json"
    res = jengine_cli("bench", tiny, *LIMITS, "--compilation-cache-dir", xla_cache_dir, "--num-prompts", "6", "--input-len", "4:40", "--output-len", "2:9", "--output-json", str(out))
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
    res = jengine_cli("generate", *args, timeout=60)
    assert res.returncode != 0 and message in res.stderr


def test_version_prints_the_package_version():
    import jengine

    res = jengine_cli("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"jengine {jengine.__version__}"


def _all_parsers():
    from jengine.cli import build_parser

    top = build_parser()
    subs = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return [("jengine", top), *subs.choices.items()]


def test_every_flag_has_help_that_states_its_default():
    from jengine.cli import _HelpFormatter

    checked = 0
    for name, parser in _all_parsers():
        fmt = _HelpFormatter(name)
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            text = fmt._expand_help(action) if action.help else ""
            assert text, f"{name} {action.option_strings or action.dest} has no help"
            assert "default" in text, f"{name} {action.option_strings or action.dest}: help does not state the default: {text!r}"
            checked += 1
    assert checked > 60  # three subcommands' engine flags and their own
    help_text = _all_parsers()[3][1].format_help()  # serve
    assert "(default: 256)" in help_text and "(default: 127.0.0.1)" in help_text


@pytest.mark.parametrize("argv", [
    ["--log-level", "info", "generate", "--prompt", "x"],
    ["generate", "--log-level", "INFO", "--prompt", "x"],
    ["--log-level", "error", "generate", "--log-level", "info"],  # the later, inner one wins
])
def test_log_level_before_or_after_the_subcommand(argv):
    from jengine.cli import parse_args

    assert parse_args(argv).log_level == "INFO"


def test_log_level_defaults_to_warning_and_rejects_junk(capsys):
    from jengine.cli import parse_args

    assert parse_args(["serve"]).log_level == "WARNING"
    with pytest.raises(SystemExit):
        parse_args(["serve", "--log-level", "loud"])


def test_served_model_name_does_not_swallow_the_model(tiny):
    from jengine.cli import parse_args

    for argv in (["serve", "--served-model-name", "a", "b", tiny], ["serve", tiny, "--served-model-name", "a", "b"]):
        ns = parse_args(argv)
        assert (ns.model, ns.served_model_name) == (tiny, ["a", "b"]), argv
    one = parse_args(["serve", "--served-model-name", "a", tiny])
    assert (one.model, one.served_model_name) == (tiny, ["a"])
    names_only = parse_args(["serve", "--served-model-name", "a", "org/b"])  # no path among them: all names
    assert (names_only.model, names_only.served_model_name) == (None, ["a", "org/b"])
    single = parse_args(["serve", "--served-model-name", "only"])
    assert (single.model, single.served_model_name) == (None, ["only"])


def test_trust_remote_code_reaches_the_tokenizer(tiny, monkeypatch):
    from jengine.cli import engine_args_from, parse_args
    from jengine.engine import core

    seen = {}

    class Stop(Exception):
        pass

    def fake_load_tokenizer(path, tokenizer=None, *, trust_remote_code=False):
        seen["trust_remote_code"] = trust_remote_code
        raise Stop

    monkeypatch.setattr(core, "load_tokenizer", fake_load_tokenizer)
    for flag, expected in (([], False), (["--trust-remote-code"], True)):
        config = engine_args_from(parse_args(["generate", tiny, *flag])).create_engine_config()
        assert config.trust_remote_code is expected
        with pytest.raises(Stop):
            core.EngineCore(config)
        assert seen.pop("trust_remote_code") is expected


@pytest.mark.parametrize("args, words", [
    (["serve", "HuggingFaceTB/SmolLM2-135M-Instruct"], ["Hugging Face Hub id", "local files", "hf download HuggingFaceTB/SmolLM2-135M-Instruct"]),
    (["generate", "--model", "org/name"], ["Hugging Face Hub id", "hf download org/name"]),
    (["generate", "./no/such/checkpoint"], ["does not exist", "local files"]),
    (["bench", "--tokenizer", "org/tok"], ["--tokenizer", "Hub id"]),
])
def test_a_model_that_is_not_local_fails_in_one_line(args, words):
    res = jengine_cli(*args, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for w in words:
        assert w in lines[0]


def test_serve_compiles_in_the_background_by_default_and_bench_does_not(tiny):
    from jengine.cli import engine_args_from, parse_args

    assert engine_args_from(parse_args(["serve", tiny])).compile_in_background is True
    assert engine_args_from(parse_args(["serve", tiny, "--no-compile-in-background"])).compile_in_background is False
    assert engine_args_from(parse_args(["bench", tiny])).compile_in_background is False
    assert engine_args_from(parse_args(["generate", tiny])).compile_in_background is False


def test_tool_and_reasoning_parser_flags(tiny, capsys):
    from jengine.cli import parse_args
    from jengine.server.api_server import ServerSettings, check_parser_settings

    ns = parse_args(["serve", tiny, "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3"])
    assert (ns.enable_auto_tool_choice, ns.tool_call_parser, ns.reasoning_parser) == (True, "hermes", "qwen3")
    from jengine.cli import engine_args_from

    assert engine_args_from(ns).reasoning_parser == "qwen3"  # the engine's constraints then start after the thinking
    assert engine_args_from(parse_args(["generate", tiny])).reasoning_parser is None
    with pytest.raises(SystemExit):
        parse_args(["serve", tiny, "--tool-call-parser", "nope"])
    with pytest.raises(ValueError, match="--tool-call-parser"):  # checked before the engine starts
        check_parser_settings(ServerSettings(enable_auto_tool_choice=True))
    check_parser_settings(ServerSettings(enable_auto_tool_choice=True, tool_call_parser="pythonic", reasoning_parser="deepseek_r1"))
