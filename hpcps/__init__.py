"""hpcps: an HPC parameter server for training language models on MPI one-sided windows."""

__version__ = "0.1.0"
