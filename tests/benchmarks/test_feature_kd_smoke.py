"""The feature-distillation benchmark's script runs and prints its one JSON line (tiny budget: figures meaningless)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_feature_benchmark_prints_one_json_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "feature_kd.py"), "--quick", "--seeds", "1",
                           "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = json.loads(proc.stdout.strip().splitlines()[-1])
    variants = {"baseline", "kd", "kd_features", "kd_attention"}
    assert variants <= line["accuracy"].keys()
    assert line["gain_vs_kd"]["kd_features"] == round(line["accuracy"]["kd_features"]["mean"]
                                                      - line["accuracy"]["kd"]["mean"], 3)
    assert {"student_alone", "kd", "kd_features", "kd_attention"} == line["step_ms"].keys()
    assert all(v > 0 for v in line["step_ms"].values())
    assert line["projector_params"]["kd_features"] > 0 == line["projector_params"]["kd_attention"]
    # the features' projected activations are saved for the backward pass too
    assert line["saved_for_backward_mb"]["kd_features"] > line["saved_for_backward_mb"]["kd"]
