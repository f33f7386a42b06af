"""Copy a trained vision-language teacher into the package, in float16 with its processor (the demo computes in
float32).

    kdkit train src/kdkit/recipes/shapes_vlm_teacher.yaml            # about 15 minutes on 2 CPU cores
    python tools/ship_vlm_teacher.py runs/shapes_vlm_teacher src/kdkit/assets/shapes_vlm/teacher
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch


def main(run_dir: str, out_dir: str) -> None:
    from kdkit.config.schema import ModelConfig
    from kdkit.models.vlm import load_processor, load_vlm_export, save_vlm

    src = Path(run_dir) / "student"
    model = load_vlm_export(src, dtype=torch.float32).to(torch.float16)
    processor = load_processor(ModelConfig(run=str(src)), "teacher")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    save_vlm(model, processor, out)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())["student"]
    meta = json.loads((out / "kdkit.json").read_text())
    meta.update(trained_by="recipes/shapes_vlm_teacher.yaml", test_exact_match=metrics.get("exact_match"),
                test_perplexity=metrics.get("perplexity"))
    (out / "kdkit.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"{out}: {size:.1f} MB, test exact match {metrics.get('exact_match')}, perplexity {metrics.get('perplexity')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
