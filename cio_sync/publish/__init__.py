"""Publishing: cutting buffered rows into batches, naming them from durable counters, encoding and publishing
them once, with manifests, dead letters and statistics."""
