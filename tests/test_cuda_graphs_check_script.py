"""benchmarks/gpu_check.py: on a machine without a CUDA GPU it says so and succeeds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script runs the real check")
def test_gpu_check_without_a_gpu_says_nothing_to_check(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no CUDA GPU: nothing to check"
    assert not list(tmp_path.iterdir())  # exported nothing, wrote nothing


def test_gpu_check_help_lists_its_options():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    for flag in ("--artifacts", "--runs", "--steps", "--fp16-tol", "--json"):
        assert flag in proc.stdout
