"""Buffers: where rows wait until they are published, in memory or in the durable spool."""
