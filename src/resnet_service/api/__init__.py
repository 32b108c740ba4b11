"""The HTTP face of the service: app factory, routes, schemas, problem+json, metrics."""
