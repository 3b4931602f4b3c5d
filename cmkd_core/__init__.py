"""cmkd_core: cross-modal knowledge distillation without paired data (arXiv:2606.10504).

A pure library: the data contract, models, alignment losses, the training loop, metrics and
ONNX export. It imports neither Prefect nor DVC, so it works from a notebook as well.
"""

__version__ = "0.1.0"
