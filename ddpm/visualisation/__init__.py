"""Pictures: image grids, figures of the reverse process, and what vizu_MNIST.py shows."""
