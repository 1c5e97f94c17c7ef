"""The engine proper: `EngineCore` (a step: schedule, run, process outputs; with asynchronous
scheduling step N+1 is dispatched before step N's outputs are processed), `AsyncEngine` (its asyncio
face, shared by the HTTP and gRPC servers), the output processor (detokenization, stop strings,
logprobs) and `validation` (the one place a request is checked before anything is queued). A request's
state lives on its `Request` record; `jengine.core.registry.RequestRegistry.free` is the one place it ends."""
