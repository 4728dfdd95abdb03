"""Benchmarks: the appliance against bare llama.cpp, in one run, as ratios (see docs/BENCHMARKS.md)."""
