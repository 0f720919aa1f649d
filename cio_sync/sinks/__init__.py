"""Sinks: the public toolkit and the sinks built on it (Advanced, Standard, Pipeline), the registry of sink
names, and closing on signals."""
