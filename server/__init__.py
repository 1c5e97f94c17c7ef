"""`jengine.server`: the OpenAI-compatible HTTP server, the gRPC service and Prometheus metrics.

Modules: `api_server` (FastAPI app, `run_servers`, `BackgroundServer`, the `jengine serve` entry),
`serving` (request handling shared by both frontends), `protocol` (request models, `APIError`),
`grpc_server` (`jengine.v1.Generation` on grpc.aio, health, reflection), `metrics` (Prometheus),
`jengine.proto` with its committed stubs `jengine_pb2*.py` (regenerate: `python -m server.gen_proto`).
Imports are lazy in the submodules so `import jengine.server` stays cheap.
"""
