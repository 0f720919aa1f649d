"""Table schemas: the columns and types of every file cio_sync writes (shared/SCHEMAS.md). Leaves: they import
nothing of cio_sync but the errors."""
