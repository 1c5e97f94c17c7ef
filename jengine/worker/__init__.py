"""The device side of the engine: the model runner (weights, KV cache, the one jitted step and its
buckets) and the fixed-shape `StepInputs` it is fed, built on the host from a scheduler output."""
