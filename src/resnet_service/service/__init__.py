"""What every face of a worker shares: its state, the classifier's loading, metrics, auth and
the upload budget. Transport-free (no FastAPI, no gRPC)."""
