"""The quality benchmark's script runs and prints its one JSON line (tiny budget: figures meaningless)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_prints_one_json_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fashion_mnist_kd.py"), "--quick", "--seeds", "1",
                           "--pairs", "cnn_to_tiny_cnn", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    pair = line["results"]["cnn_to_tiny_cnn"]
    assert {"teacher", "baseline", "kd", "dkd", "gain"} <= pair.keys()
    assert pair["gain"]["kd"] == round(pair["kd"]["mean"] - pair["baseline"]["mean"], 3)
