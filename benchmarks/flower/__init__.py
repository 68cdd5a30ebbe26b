"""fedpipe side by side with Flower's simulation engine (``python -m benchmarks.flower_bench``)."""
