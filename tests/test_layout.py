"""The hive side stays light: it must start without torch or transformers."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.unit


def test_hive_never_imports_torch():
    code = (
        "import sys, hive.cli, hive.app, hive.api, hive.relay, hive.jobs, hive.client, hive.embedded, hive.hub_mirror, hive.hub_proxy; "
        "heavy = {'torch', 'transformers', 'accelerate'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
