"""Table schemas: one spec per table of every file cio_sync writes (shared/SCHEMAS.md, docs/standard.md). The
lowest layer but the leaf modules: it imports nothing of cio_sync above it."""
