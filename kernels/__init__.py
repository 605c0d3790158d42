"""Triton kernels of mmfast (installed as mmfast.kernels). Importing this package needs triton."""
