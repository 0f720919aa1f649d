"""Loading: reads published files (not sinks) into a warehouse, each exactly once."""
