"""Storage: the create-only writer over fsspec, its retries, and the quirks of each backend. Knows no modes."""
