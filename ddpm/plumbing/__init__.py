"""Shared plumbing: settings, presets and flags, the command line, device, checkpoints, files."""
