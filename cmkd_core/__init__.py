"""cmkd_core: cross-modal knowledge distillation without paired data (arXiv:2606.10504).

A pure library: the data contract, models, alignment losses, the training loop, metrics and
ONNX export. It imports neither Prefect nor DVC, so it works from a notebook as well.
"""

import os

# POT imports every array backend it finds at import time. JAX's, where installed, grabs 75% of
# the GPU's memory in each process (worker processes of the benchmark then fail with CUDA out
# of memory); cmkd only hands POT torch tensors, so the others stay off unless asked for.
for _backend in ("JAX", "CUPY", "TENSORFLOW"):
    os.environ.setdefault(f"POT_BACKEND_DISABLE_{_backend}", "1")

__version__ = "0.1.0"
