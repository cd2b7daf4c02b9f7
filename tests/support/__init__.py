"""Helpers that start real servers (llama.cpp, the sim) on 127.0.0.1 for tests and benchmarks."""
