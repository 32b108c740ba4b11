"""Developer tools run by the tests and the Makefile (not part of the service)."""
