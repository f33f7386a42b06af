"""One vision-language distillation step, four ways, side by side: samples/s and peak memory.

Variants (each measured in a fresh process, so one's memory never hides another's):
  sft           the student alone: forward with images, the model's own full-logit cross-entropy, backward
  teacher_fwd   the teacher's forward pass only (no_grad)
  naive         the usual recipe: full logits of both models, float32 log-softmax, F.kl_div, plus the CE
  kdkit         what VLMDistiller runs: hidden states only, kdkit.losses.fused_terms (KD + CE in one chunked pass)

On CUDA: Qwen2-VL-2B / 7B-shaped configs with random weights and their real vocabularies (151936 / 152064 rows:
the heads are sliced to the shared rows), bf16; on CPU: small ones. Images of 224x224 (patch 14, merge 2: 64 image
tokens each); the loss falls on the second half of the text. Prints one JSON line; results go to benchmarks/RESULTS.md.

    python benchmarks/vlm_kd_step.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

# text (hidden, layers, heads, kv heads, intermediate, vocab), vision (depth, embed dim, heads)
CPU_PAIR = {"student": ((256, 2, 4, 2, 704, 32000), (2, 128, 4)), "teacher": ((512, 4, 8, 2, 1408, 32128), (4, 256, 8))}
CUDA_PAIR = {"student": ((1536, 28, 12, 2, 8960, 151936), (32, 1280, 16)),
             "teacher": ((3584, 28, 28, 4, 18944, 152064), (32, 1280, 16))}
VARIANTS = ("sft", "teacher_fwd", "naive", "kdkit")
T, ALPHA = 2.0, 0.9
IMAGE_TOKEN, START, END = 5, 6, 7
PATCHES, GRID = 256, (1, 16, 16)  # 224 / 14 = 16 patches a side; / merge^2 = 64 tokens


def _model(shape, dtype, device):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    (hidden, layers, heads, kv, inter, vocab), (depth, embed, vheads) = shape
    half = hidden // heads // 2
    cfg = Qwen2VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
                     "num_key_value_heads": kv, "intermediate_size": inter, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e6,
                                         "mrope_section": [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]}},
        vision_config={"depth": depth, "embed_dim": embed, "num_heads": vheads, "hidden_size": hidden, "patch_size": 14},
        image_token_id=IMAGE_TOKEN, vision_start_token_id=START, vision_end_token_id=END, video_token_id=8)
    torch.manual_seed(0)
    return Qwen2VLForConditionalGeneration(cfg).to(device=device, dtype=dtype)


def _inputs(batch: int, text: int, vocab: int, device, dtype) -> dict:
    image = [START] + [IMAGE_TOKEN] * (PATCHES // 4) + [END]
    rows = [torch.cat([torch.tensor(image), torch.randint(10, vocab, (text,))]) for _ in range(batch)]
    ids = torch.stack(rows).to(device)
    labels = ids.clone()
    labels[:, : len(image) + text // 2] = -100  # the answer: the second half of the text
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": (ids == IMAGE_TOKEN).long(),
            "pixel_values": torch.randn(batch * PATCHES, 3 * 2 * 14 * 14, device=device, dtype=dtype),
            "image_grid_thw": torch.tensor([GRID] * batch, device=device), "labels": labels}


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_variant(variant: str, pair: dict, batch: int, text: int, steps: int) -> dict:
    from kdkit.losses.fused import fused_terms

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    student = _model(pair["student"], dtype, device).train()
    teacher = _model(pair["teacher"], dtype, device).eval().requires_grad_(False)
    if cuda and variant != "teacher_fwd":
        student.gradient_checkpointing_enable()
    rows = student.lm_head.weight.shape[0]  # the shared vocabulary: the teacher's padded head is sliced to it
    batch_in = _inputs(batch, text, rows, device, dtype)
    labels = batch_in.pop("labels")
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)

    def step():
        if variant == "sft":
            student(**batch_in, labels=labels).loss.backward()
        elif variant == "teacher_fwd":
            with torch.no_grad():
                teacher(**batch_in)
        elif variant == "naive":
            with torch.no_grad():
                t_logits = teacher(**batch_in).logits[..., :rows].float()
            s_logits = student(**batch_in).logits.float()
            keep = shifted != -100
            kd = F.kl_div(F.log_softmax(s_logits[keep] / T, -1), F.log_softmax(t_logits[keep] / T, -1),
                          log_target=True, reduction="batchmean") * T * T
            (ALPHA * kd + (1 - ALPHA) * F.cross_entropy(s_logits[keep], shifted[keep])).backward()
        else:
            with torch.no_grad():
                t_hidden = teacher.model(**batch_in, use_cache=False).last_hidden_state
            s_hidden = student.model(**batch_in, use_cache=False).last_hidden_state
            terms = [{"name": "ce", "kind": "ce", "weight": 1 - ALPHA},
                     {"name": "kd", "kind": "forward_kl", "weight": ALPHA, "temperature": T, "scale": T * T}]
            loss, _ = fused_terms(s_hidden, student.lm_head.weight, shifted, terms, teacher_hidden=t_hidden,
                                  teacher_weight=teacher.lm_head.weight, vocab_rows=rows)
            loss.backward()
        student.zero_grad(set_to_none=True)

    step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"variant": variant, "samples_per_s": round(batch * steps / elapsed, 3), "step_s": round(elapsed / steps, 4)}
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        out["peak_step_mem_mb"] = round(_peak_mb() - base, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--text", type=int, default=None, help="text tokens per sample besides the image's")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    pair = CUDA_PAIR if cuda else CPU_PAIR
    batch, text = args.batch or (4 if cuda else 4), args.text or (512 if cuda else 256)
    if args.one:
        try:
            print(json.dumps(run_variant(args.one, pair, batch, text, args.steps)))
        except torch.OutOfMemoryError:
            print(json.dumps({"variant": args.one, "error": "out of memory"}))
        return
    results = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
               "torch": torch.__version__, "pair": "Qwen2-VL 7B->2B shapes" if cuda else "cpu-small", "batch": batch,
               "text_tokens": text, "image_tokens": PATCHES // 4, "steps": args.steps, "variants": {}}
    for variant in args.variants:
        cmd = [sys.executable, __file__, "--one", variant, "--batch", str(batch), "--text", str(text),
               "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
        results["variants"][variant] = json.loads(line) if line.startswith("{") else {"error": done.stderr.strip()[-300:]}
        print(f"{variant}: {results['variants'][variant]}", file=sys.stderr, flush=True)
    v = results["variants"]
    sft, tf = v.get("sft", {}).get("samples_per_s"), v.get("teacher_fwd", {}).get("samples_per_s")
    if sft and tf:
        results["ideal_online_kd_samples_per_s"] = round(1 / (1 / sft + 1 / tf), 3)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
