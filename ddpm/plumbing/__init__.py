"""Shared plumbing: settings and flags, the command line, the device and precision, checkpoints, output files."""
