"""The Open Inference Protocol v2 face: one data plane, its REST and gRPC transports, one error
builder and status table, and the generated gRPC modules (``pb/``)."""
