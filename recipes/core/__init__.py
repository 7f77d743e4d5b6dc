"""Shared pieces of the benchmark recipes: presets (config), arguments, data, outputs and tables."""
