"""The command layer: the ``cmkd`` command line, what it shows a person, and the process
plumbing around the pipeline (the shared local Prefect server, the stage worker that makes a
bare ``dvc repro`` fast, the fast exit, the ``torchrun`` entry point).

It sits on top: it imports ``flows``, ``tasks`` and ``cmkd_core``; none of them imports it
(docs/architecture.md, tests/test_layers.py).
"""
