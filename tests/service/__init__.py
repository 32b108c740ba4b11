"""The service in-process: the HTTP app over httpx's ASGI transport, lifespan on."""
