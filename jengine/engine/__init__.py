"""The engine proper: `EngineCore` (one synchronous step at a time: schedule, run, process outputs),
`AsyncEngine` (its asyncio face, shared by the HTTP and gRPC servers) and the output processor
(detokenization, stop strings, logprobs)."""
