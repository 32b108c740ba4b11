"""The protocol faces, siblings over the service: ``http`` (the JSON API, operations, the page)
and ``oip`` (the Open Inference Protocol, over REST and gRPC). No face imports another."""
