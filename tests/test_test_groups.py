"""The suite's own scheduling: scripts/test.sh runs the tests in three processes with --dist loadgroup,
and relies on the tests of one xdist_group running in one process, one after the other
(tests/test_cluster.py's share one three-node cluster; the two compose stacks must not run at once).
pytest 9.2 with pytest-xdist 3.8 spread a group over the processes without a word."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

GROUPED = textwrap.dedent("""
    import os
    import pytest

    def record(name):
        with open(os.environ["FEDQ_GROUP_RECORD"], "a") as out:
            out.write(f"{name} {os.environ.get('PYTEST_XDIST_WORKER', 'main')}\\n")

    @pytest.mark.xdist_group("together")
    def test_first():
        record("first")

    @pytest.mark.parametrize("n", range(6))
    def test_other(n):
        record(f"other-{n}")

    @pytest.mark.xdist_group("together")
    def test_second():
        record("second")
""")


def test_the_tests_of_one_xdist_group_run_in_one_process(tmp_path: Path):
    (tmp_path / "test_grouped.py").write_text(GROUPED)
    record = tmp_path / "record.txt"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "3", "--dist", "loadgroup", "-q",
         "--rootdir", str(tmp_path), str(tmp_path / "test_grouped.py")],
        cwd=tmp_path, env={**os.environ, "FEDQ_GROUP_RECORD": str(record)}, capture_output=True, text=True,
        timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    workers = dict(line.split() for line in record.read_text().splitlines())
    assert len(workers) == 8, workers
    assert workers["first"].startswith("gw"), f"not run by xdist: {workers}"
    assert workers["first"] == workers["second"], (
        f"the group ran in {workers['first']} and {workers['second']}: this pytest and pytest-xdist do not keep "
        "xdist_group together; install the versions pyproject.toml names")
