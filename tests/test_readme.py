"""The README's commands are what CI runs, and the CLI documented there exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command() -> None:
    test_command = next(c for c in _readme_commands() if "pytest" in c)
    last = test_command.split("&&")[-1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    install = 'pip install -e ".[test]" -c infra/docker/constraints.txt'
    assert install in test_command, "the README's test command installs with the pinned constraints"
    assert "pip install -q torch==2.13.0" in ci and install.replace("install", "install -q", 1) in ci
    assert re.search(rf"^{re.escape(last)}$", ci, flags=re.M), f"{last!r} not run by .ci/run"


def test_readme_demo_command_uses_the_console_script() -> None:
    demo = next(c for c in _readme_commands() if c.rstrip().endswith("drrfarm demo"))
    assert demo.startswith("python3 -m venv .venv")
