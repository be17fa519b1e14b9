"""The README's set-up section and .ci/run agree: CI runs exactly the commands a new user runs."""

import os
import re

from tests._data import REPO


def _setup_commands():
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme.split("## Set-up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = _setup_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds), cmds
    assert "regift_jax.train" in cmds[0] and ".[test]" not in cmds[0]
    assert "pytest" in cmds[1] and ".[test]" in cmds[1]


def test_ci_runs_both_readme_commands_verbatim_in_order():
    ci_lines = [l.strip() for l in open(os.path.join(REPO, ".ci", "run"), encoding="utf-8").read().splitlines()]
    cmds = _setup_commands()
    where = [ci_lines.index(c) for c in cmds]  # ValueError names a command CI does not run
    assert where == sorted(where), "CI must run the main job before the tests"
    # each in its own fresh venv: a venv is created between the two commands
    between = "\n".join(ci_lines[where[0] + 1:where[1]])
    assert "fresh_venv" in between
