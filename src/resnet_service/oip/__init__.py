"""The Open Inference Protocol (v2, KServe/Triton) over the same core as the JSON API: one
transport-free data plane, faced by REST (``api/v2.py``) and gRPC (``grpc_api/``)."""
