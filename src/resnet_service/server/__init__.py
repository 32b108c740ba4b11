"""The process layer: the supervisor, its workers (each builds the service and starts its faces
as peers), uvicorn hardening, sockets, the launch of ``serve``, and the HTTP app's assembly."""
