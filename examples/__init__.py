"""Experiments that use the mta package: each subfolder is runnable with `python -m examples.<name>...`."""
