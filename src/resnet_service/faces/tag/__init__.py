"""The tag job: a whole library through the core, no HTTP (``resnet-service tag``).

sources (a streamed listing) -> job (one worker process per core, each reading, decoding and
inferring in batches) -> store (Parquet or JSON-lines parts, committed by atomic rename).
An input's identity is (path, size, modification time or ETag): what is committed is skipped,
which gives resume after a crash, exactly-once output and the nightly incremental run.
"""
