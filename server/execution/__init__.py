"""What every rank runs: the mirror of the running requests, the step builder, the model runner and its CUDA
graphs, the worker loop, and the per-rank profilers. It executes the plans that :mod:`server.control` makes.
"""
