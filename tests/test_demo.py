"""The README's main-job command, scripts/demo.sh, with every address moved by INSPECTD_* variables: it must
wait on, print and watch the addresses the daemon really uses (it used to poll 9108 and watch 5556
whatever the overrides said). Runs in the test venv (bootstrap finds it installed) for 20 s."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT, free_port

pytestmark = pytest.mark.slow


def test_demo_sh_uses_the_addresses_the_overrides_give(tmp_path):
    ports = {name: free_port() for name in ("metrics", "publish", "replay", "ui")}
    env = {
        **{k: v for k, v in os.environ.items() if not k.upper().startswith("INSPECTD_")},
        "INSPECTD_VENV": str(Path(sys.prefix)),
        "INSPECTD_METRICS__PORT": str(ports["metrics"]),
        "INSPECTD_PUBLISH__ENDPOINT": f"tcp://127.0.0.1:{ports['publish']}",
        "INSPECTD_REPLAY__ENDPOINT": f"tcp://127.0.0.1:{ports['replay']}",
        "INSPECTD_UI__PORT": str(ports["ui"]),
    }
    proc = subprocess.run(
        [str(ROOT / "scripts" / "demo.sh"), "20"], capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    ready = next((line for line in out.splitlines() if line.startswith("demo: daemon ready")), "")
    assert f"http://127.0.0.1:{ports['ui']}/" in ready and f"http://127.0.0.1:{ports['metrics']}/metrics" in ready, out
    assert f"tcp://127.0.0.1:{ports['publish']}" in ready, out
    # The watcher got the daemon's events on the moved endpoint: defects printed (`CAMERA #SEQ ... DEFECT`).
    assert re.search(rf"connected to run [0-9a-f]+ at tcp://127.0.0.1:{ports['publish']}", out), out
    assert "9108" not in out and ":5556" not in out, out
