"""The benchmark harness: engine ceiling, the service over HTTP, and the naive baseline,
measured in one run on one machine and reported as ratios (``resnet-service bench``)."""
