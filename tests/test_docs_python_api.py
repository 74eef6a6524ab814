"""docs/python-api.md runs as written: its python blocks, in order, in one fresh
interpreter (in a temporary folder, against the simulated provider)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "python-api.md"


def test_every_python_block_of_the_doc_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6  # the page lost its examples, or the pattern broke
    script = tmp_path / "doc.py"
    script.write_text("\n".join(blocks) + "\nprint('DOC OK')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local",
           "RAY_DEDUP_LOGS": "0"}
    p = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=280)
    assert p.returncode == 0 and p.stdout.rstrip().endswith("DOC OK"), p.stderr[-4000:]
    assert "JobSpec: limits.rpm: Input should be greater than 0" in p.stdout
    assert "dataset has no column 'prompt'" in p.stdout
