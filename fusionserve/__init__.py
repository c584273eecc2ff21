"""fusionserve: an inference server for decoder LLMs with fused deferred-norm Triton kernels.

The rooms are the repository's top-level folders, installed under this namespace:
``fusionserve.server`` (``api`` = the HTTP process, ``engine`` = the engine core),
``fusionserve.models`` (checkpoints, the decoder) and ``fusionserve.kernels``
(the Triton kernels and their torch references). In a checkout they are symbolic
links beside this file, so the tree runs as installed; docs/DESIGN.md is the map.
"""

__version__ = "0.2.0"
