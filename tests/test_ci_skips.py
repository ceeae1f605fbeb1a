"""No silent skips in CI: with `CI` set, a test that skips (the SmolLM2 GGUF, the committed weights,
pexpect, PostgreSQL or a codec missing) fails instead (tests/conftest.py); without it, it skips."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, expected", [("1", "1 failed, 1 passed, 1 xfailed, 2 errors"),
                                          ("", "1 passed, 3 skipped, 1 xfailed")])
def test_a_skip_fails_when_ci_is_set(tmp_path, ci, expected):
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_needs.py").write_text(
        "import importlib.util\n"
        "import pytest\n"
        "@pytest.mark.skipif(importlib.util.find_spec('no_such_wheel') is None, reason='the GGUF wheel is not installed')\n"
        "def test_gguf(): pass\n"
        "def test_pexpect(): pytest.importorskip('no_such_pexpect')\n"
        "@pytest.fixture\n"
        "def server(): pytest.skip('PostgreSQL not available')\n"
        "def test_pg(server): pass\n"
        "@pytest.mark.xfail(reason='a known failure is not a skip')\n"
        "def test_known(): assert False\n"
        "def test_fine(): pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"CI": ci}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert expected in r.stdout.splitlines()[-1], r.stdout[-2000:]
    if ci:
        assert "skipped while CI is set" in r.stdout and "the GGUF wheel is not installed" in r.stdout
