"""Unit tests: the core, the models and training parts, with no HTTP and no server."""
