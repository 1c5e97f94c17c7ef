"""LoRA adapters through the OpenAI server: `--lora-modules` at start, `/v1/models` lists adapters with
their parent, a request's `model` picks the adapter (greedy text equal to Hugging Face PEFT's), and the
load / unload endpoints (behind their flag and the API key) change what can be picked while serving;
a request in flight keeps its adapter when it is unloaded."""
from __future__ import annotations

import threading

import httpx
import openai
import pytest

from jengine.config import EngineArgs
from jengine.engine.async_engine import AsyncEngine
from jengine.server.api_server import BackgroundServer, ServerSettings
from lora_adapters import ALL_MODULES, make_adapter, peft_model
from test_engine import hf_greedy
from tiny_models import make_tiny_checkpoint, make_tiny_tokenizer
from tiny_server import slow_down_steps

KEY = "sk-lora-test"
PROMPT = [7, 21, 42, 99, 150, 3, 77]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, xla_cache_dir):
    root = tmp_path_factory.mktemp("lora-server")
    base = make_tiny_checkpoint(root, "llama")
    paths = {"qvd": make_adapter(base, str(root / "qvd"), seed=1, r=4, alpha=8),
             "all": make_adapter(base, str(root / "all"), seed=2, r=8, alpha=16, targets=ALL_MODULES)}
    tok = make_tiny_tokenizer()
    want = {name: tok.decode(hf_greedy(peft_model(base, path), PROMPT, MAX_TOKENS)) for name, path in paths.items()}
    args = EngineArgs(model=base, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32, compilation_cache_dir=xla_cache_dir,
                      enable_lora=True, max_loras=2, max_lora_rank=8)
    engine = AsyncEngine.from_engine_args(args, log_requests=False)
    settings = ServerSettings(port=0, uvicorn_log_level="warning", model_path=base, served_model_names=("tiny",), api_keys=(KEY,),
                              lora_modules=[("qvd", paths["qvd"])], allow_runtime_lora_updating=True, grpc_port=0)
    srv = BackgroundServer(engine, settings)
    try:
        yield srv, engine, paths, want
    finally:
        srv.stop()
        engine.shutdown()


def _complete(client: openai.OpenAI, model: str, **kw) -> str:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0, extra_body={"ignore_eos": True}, **kw)
    return out.choices[0].text


def test_load_serve_unload_reload(setup):
    srv, engine, paths, want = setup
    http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        models = {m.id: m for m in client.models.list().data}
        assert set(models) == {"tiny", "qvd"} and models["qvd"].parent == "tiny" and models["tiny"].parent is None
        assert _complete(client, "qvd") == want["qvd"]
        base_text = _complete(client, "tiny")
        assert base_text != want["qvd"]

        with pytest.raises(openai.NotFoundError) as info:
            _complete(client, "all")
        assert info.value.body["param"] == "model" and "`all` does not exist" in info.value.body["message"]

        # Load: the key applies; bad input is a 400 naming it; then the adapter serves.
        assert httpx.post(srv.url + "/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": paths["all"]}).status_code == 401
        bad = http.post("/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": paths["all"] + "-missing"})
        assert bad.status_code == 400 and "does not exist" in bad.json()["error"]["message"]
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "all"}).json()["error"]["param"] == "lora_path"
        ok = http.post("/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": paths["all"]})
        assert ok.status_code == 200, ok.text
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": paths["all"]}).status_code == 400
        assert {m.id for m in client.models.list().data} == {"tiny", "qvd", "all"}
        chat = client.chat.completions.create(model="all", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0.0)
        assert chat.choices[0].message.content is not None
        assert _complete(client, "all") == want["all"]

        # Unload: new requests get 404, a second unload too; reload serves the same output again.
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "all"}).status_code == 200
        with pytest.raises(openai.NotFoundError):
            _complete(client, "all")
        gone = http.post("/v1/unload_lora_adapter", json={"lora_name": "all"})
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "NotFoundError"
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "all", "lora_path": paths["all"]}).status_code == 200
        assert _complete(client, "all") == want["all"]
        assert _complete(client, "tiny") == base_text

        metrics = http.get("/metrics").text
        assert 'vllm:lora_requests_info{max_lora="2"' in metrics
    assert engine.core.compilations_after_warmup == 0


def test_grpc_takes_an_adapter_name(setup):
    import grpc

    from jengine.server import jengine_pb2 as pb
    from jengine.server import jengine_pb2_grpc as pb_grpc

    srv, engine, paths, want = setup
    with grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        params = pb.SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=MAX_TOKENS)
        msgs = list(stub.Generate(pb.GenerateRequest(model="qvd", prompt_token_ids=PROMPT, sampling_params=params), timeout=60))
        assert "".join(m.text for m in msgs) == want["qvd"]
        assert "qvd" in {m.id for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models}
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(model="nope", prompt_token_ids=PROMPT, sampling_params=params), timeout=60))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_request_in_flight_keeps_its_adapter(setup, monkeypatch):
    srv, engine, paths, want = setup
    slow_down_steps(engine, monkeypatch, 0.2)
    http = httpx.Client(base_url=srv.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as client:
        result: dict[str, str] = {}
        started = threading.Event()

        def run() -> None:
            chunks = []
            for chunk in client.completions.create(model="qvd", prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0.0,
                                                   extra_body={"ignore_eos": True}, stream=True):
                started.set()
                chunks.append(chunk.choices[0].text if chunk.choices else "")
            result["text"] = "".join(chunks)

        worker = threading.Thread(target=run)
        worker.start()
        assert started.wait(30)
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "qvd"}).status_code == 200
        worker.join(60)
        assert result["text"] == want["qvd"]
        with pytest.raises(openai.NotFoundError):
            _complete(client, "qvd")
        assert http.post("/v1/load_lora_adapter", json={"lora_name": "qvd", "lora_path": paths["qvd"]}).status_code == 200


def test_endpoints_need_the_flag(tmp_path, xla_cache_dir):
    """Without the flag the endpoints do not exist; without --enable-lora, --lora-modules is refused."""
    from jengine.server.api_server import build_app, make_serving

    base = make_tiny_checkpoint(tmp_path, "llama")
    engine = AsyncEngine.from_engine_args(EngineArgs(model=base, max_model_len=64, max_num_seqs=4, max_num_batched_tokens=32,
                                                     compilation_cache_dir=xla_cache_dir), log_requests=False)
    try:
        with pytest.raises(ValueError, match="LoRA is not enabled"):
            make_serving(engine, ServerSettings(model_path=base, lora_modules=[("x", str(tmp_path))]))
        serving, metrics = make_serving(engine, ServerSettings(model_path=base))
        from fastapi.testclient import TestClient

        client = TestClient(build_app(serving, metrics))
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "/x"}).status_code == 404
        assert "lora_requests_info" not in client.get("/metrics").text
    finally:
        engine.shutdown()


def test_serve_flags_are_checked_before_loading(tmp_path, capsys):
    from jengine.cli import main

    base = make_tiny_checkpoint(tmp_path, "llama")
    assert main(["serve", base, "--lora-modules", f"a={tmp_path}"]) == 2
    assert "--lora-modules needs --enable-lora" in capsys.readouterr().err
    assert main(["serve", base, "--enable-lora", "--lora-modules", "no-equals-sign"]) == 2
    assert "expected name=path" in capsys.readouterr().err
    assert main(["serve", base, "--enable-lora", "--max-loras", "2", "--max-cpu-loras", "1"]) == 2
    assert "max_cpu_loras" in capsys.readouterr().err
