"""Benchmarks: ddp-launch side by side with torchrun (python -m benchmarks; see README.md)."""
