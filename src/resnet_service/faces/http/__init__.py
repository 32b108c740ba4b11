"""The JSON API face: ``/classify``, ``/classify/batch``, operations, the upload page,
problem+json handlers, multipart uploads and the OpenAPI details."""
