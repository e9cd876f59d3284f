"""The README's Python snippet runs as written, in a fresh process, finding its data the documented way."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.integration
def test_readme_python_snippet_runs_as_written(tmp_path, data_dir):
    snippet = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    # No SELFPRUNE_DATA_DIR: the data folder comes from the saved user config, as after scripts/install.sh.
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data_dir": str(data_dir)}))
    env = {k: v for k, v in os.environ.items() if k != "SELFPRUNE_DATA_DIR"} | {"SELFPRUNE_CONFIG": str(config)}
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "of decoder-layer parameters" in done.stdout and (tmp_path / "pruned" / "model.safetensors").is_file()
    report = json.loads((tmp_path / "pruned" / "selfprune_report.json").read_text())
    assert report, "the Python API saved an empty report"
