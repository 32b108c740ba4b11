"""The transport-free core: the input contract (images), admission, the micro-batching engine,
the classifier over them, and every domain error. Nothing here knows HTTP or gRPC."""
