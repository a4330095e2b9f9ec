"""The device check's shell scripts: they parse, and what they pin exists (running them is the
device session's job; the CPU dry run of the same steps is in tests/test_bench_gpu.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = [ROOT / "scripts" / "build-device-wheels.sh", ROOT / "scripts" / "device-check.sh"]


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash here")
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True, timeout=30).returncode == 0


def test_pinned_packages_are_the_constraints():
    constraints = (ROOT / "constraints.txt").read_text()
    names = re.findall(r'"\$\(pin ([a-z0-9-]+)\)"', (SCRIPTS[0]).read_text())
    assert names == ["pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle"]
    for name in names:
        assert re.search(rf"^{name}==", constraints, re.M), name


def test_the_bundle_folder_is_ignored_and_the_readme_names_the_command():
    assert "/.device-check/" in (ROOT / ".gitignore").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    assert 'command="bash scripts/device-check.sh", carry=[".device-check"], timeout_s=600' in readme
