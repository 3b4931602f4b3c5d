"""Prefect flows: one per stage (``flows.stages``) and the whole ``pipeline``; no maths here."""

import tasks  # noqa: F401  (sets Prefect's offline defaults before Prefect is imported)
