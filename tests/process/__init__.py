"""Real processes: `resnet-service serve` (uvicorn workers on 127.0.0.1), the CLI, the benchmark harness."""
