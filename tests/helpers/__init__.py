"""Test helpers shared by tests and benchmarks (loopback chat server, tiny vision-language model)."""
