"""Copy a trained language-model teacher into the package, in float16 (half the bytes; the demo computes in float32).

    kdkit train src/kdkit/recipes/stdlib_lm_teacher.yaml            # about 45 minutes on 2 CPU cores
    python tools/ship_lm_teacher.py runs/stdlib_lm_teacher src/kdkit/assets/stdlib_lm/teacher
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch


def main(run_dir: str, out_dir: str) -> None:
    from kdkit.config.schema import ModelConfig
    from kdkit.models.lm import load_tokenizer
    from kdkit.models.lora import load_causal_lm_export, save_causal_lm

    src = Path(run_dir) / "student"
    model = load_causal_lm_export(src, dtype=torch.float32).to(torch.float16)
    tokenizer = load_tokenizer(ModelConfig(run=run_dir), "teacher")  # the class it was saved as (see _as_declared)
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    metrics = json.loads((Path(run_dir) / "metrics.json").read_text())["student"]
    save_causal_lm(model, tokenizer, out, meta={"trained_by": "recipes/stdlib_lm_teacher.yaml",
                                               "test_perplexity": metrics.get("perplexity")})
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    print(f"{out}: {size:.1f} MB, test perplexity {metrics.get('perplexity')}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
