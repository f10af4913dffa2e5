"""Benchmarks of this repo against diffusers and denoising-diffusion-pytorch; run as modules.

Example:
    python -m benchmarks.throughput --amp bf16 --threads 1
"""
