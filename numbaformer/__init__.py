"""numbaformer: GGUF language models on GPU and CPU kernels written in Python with Numba.

Importing the package is cheap: it imports neither numba.cuda nor the kernels. Backends load lazily.
"""
__version__ = "0.1.0"
