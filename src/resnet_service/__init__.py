"""resnet-service: a fast, CPU-first image-classification microservice (int8 ResNet18)."""

__version__ = "0.1.0"
