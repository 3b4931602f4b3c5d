"""The README's two set-up commands stay true: CI runs the second one verbatim."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_opens_with_the_pipeline_and_the_test_command():
    run, test = _readme_commands()
    assert run.startswith("python3.11 -m venv .venv") and run.endswith("cmkd run")
    assert test.startswith("python3.11 -m venv .venv") and test.endswith("pytest")


def test_ci_runs_the_readme_test_command_verbatim():
    _, test = _readme_commands()
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines
