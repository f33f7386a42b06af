"""One language-model distillation step, five ways, side by side: tokens/s and peak memory.

Variants (each measured in a fresh process, so one's memory never hides another's):
  sft           the student alone: forward, cross-entropy on labels, backward (the model's own full-logit loss)
  teacher_fwd   the teacher's forward pass only (no_grad)
  naive         the seeds' recipe: full logits of both models, float32 log-softmax, F.kl_div, plus the CE
  liger         Liger-Kernel's fused-linear JSD (only when liger_kernel is installed; CUDA)
  kdkit         what LMDistiller runs: kdkit.losses.fused_terms (KD + CE in one chunked pass over the head)
  cached        kdkit from a teacher cache (kdkit.teacher_cache): top-64 rows stored as int16 ids / float16
                log-probs, read and widened every step; no teacher forward (goal: >= 0.9x sft's tokens/s)

On CUDA: Qwen2-shaped configs with random weights and Qwen2's real vocabulary (ANCHORS.md sizes); on CPU: small
ones (hidden 256, vocabulary 32k, 4096 positions). Prints one JSON line; results go to benchmarks/RESULTS.md.

    python benchmarks/llm_kd_step.py                 # every variant of the default pair for this device
    python benchmarks/llm_kd_step.py --steps 5 --batch 4 --seq 1024
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

# (student, teacher) shapes: hidden, layers, heads, kv heads, intermediate
CPU_PAIR = {"vocab": 32000, "student": (256, 2, 4, 2, 704), "teacher": (512, 4, 8, 2, 1408)}
CUDA_PAIRS = {
    "1.5B->0.5B": {"vocab": 151936, "student": (896, 24, 14, 2, 4864), "teacher": (1536, 28, 12, 2, 8960)},
    "7B->1.5B": {"vocab": 152064, "student": (1536, 28, 12, 2, 8960), "teacher": (3584, 28, 28, 4, 18944)},
}
VARIANTS = ("sft", "teacher_fwd", "naive", "liger", "kdkit", "cached")
TOP_K = 64
T, ALPHA = 2.0, 0.9  # temperature, KD weight (0.1 CE)


def _model(vocab: int, shape, dtype, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, inter = shape
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=8192,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=dtype)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run_variant(variant: str, pair: dict, batch: int, seq: int, steps: int) -> dict:
    from kdkit.losses.fused import fused_terms

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    student = _model(pair["vocab"], pair["student"], dtype, device).train()
    teacher = _model(pair["vocab"], pair["teacher"], dtype, device).eval().requires_grad_(False)
    if cuda and variant != "teacher_fwd":
        student.gradient_checkpointing_enable()
    ids = torch.randint(0, pair["vocab"], (batch, seq), device=device)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt: loss on 3/4 of the positions
    shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # (B, S) next-token targets
    terms = [{"name": "ce", "kind": "ce", "weight": 1 - ALPHA},
             {"name": "kd", "kind": "forward_kl", "weight": ALPHA, "temperature": T, "scale": T * T}]
    stored = None
    if variant == "cached":  # what `kdkit cache` writes for these positions (made once, outside the timing)
        from kdkit.losses.sparse import topk_log_probs

        with torch.no_grad():
            rows = teacher.model(input_ids=ids).last_hidden_state[shifted != -100]
            parts = [topk_log_probs(rows[i:i + 1024] @ teacher.lm_head.weight.T, TOP_K, T)
                     for i in range(0, rows.shape[0], 1024)]
        stored = ((torch.cat([p[0] for p in parts]) - 32768).to(torch.int16).cpu(),
                  torch.cat([p[1] for p in parts]).half().cpu(), torch.cat([p[2] for p in parts]).float().cpu())
        del teacher

    def step():
        if variant == "sft":
            loss = student(input_ids=ids, labels=labels).loss
            loss.backward()
        elif variant == "teacher_fwd":
            with torch.no_grad():
                teacher(input_ids=ids)
        elif variant == "naive":
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits.float()
            s_logits = student(input_ids=ids).logits.float()
            keep = shifted != -100
            log_s = F.log_softmax(s_logits[keep] / T, -1)
            log_t = F.log_softmax(t_logits[keep] / T, -1)
            kd = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * T * T
            ce = F.cross_entropy(s_logits[keep], shifted[keep])
            (ALPHA * kd + (1 - ALPHA) * ce).backward()
        elif variant == "liger":
            from liger_kernel.transformers import LigerFusedLinearJSD

            jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=T)
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=ids).last_hidden_state
            s_hidden = student.model(input_ids=ids).last_hidden_state
            loss = jsd(s_hidden.reshape(-1, s_hidden.shape[-1]), student.lm_head.weight,
                       t_hidden.reshape(-1, t_hidden.shape[-1]), teacher.lm_head.weight, shifted.reshape(-1))
            loss.backward()
        elif variant == "cached":
            topk = ((stored[0].long() + 32768).to(device), stored[1].float().to(device), stored[2].to(device))
            s_hidden = student.model(input_ids=ids).last_hidden_state
            loss, _ = fused_terms(s_hidden, student.lm_head.weight, shifted, terms, teacher_topk=topk)
            loss.backward()
        else:  # kdkit
            with torch.no_grad():
                t_hidden = teacher.model(input_ids=ids).last_hidden_state
            s_hidden = student.model(input_ids=ids).last_hidden_state
            loss, _ = fused_terms(s_hidden, student.lm_head.weight, shifted, terms, teacher_hidden=t_hidden,
                                  teacher_weight=teacher.lm_head.weight)
            loss.backward()
        student.zero_grad(set_to_none=True)

    step()  # warm-up (and the allocator's first growth)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_rss = _rss_mb()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"variant": variant, "tokens_per_s": round(batch * seq * steps / elapsed, 1),
           "step_s": round(elapsed / steps, 4)}
    if cuda:
        out["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        # the step's own memory: the process's peak resident size above what it held before the timed steps
        out["peak_step_mem_mb"] = round(_peak_mb() - base_rss, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--pairs", nargs="*", default=None, help=f"CUDA pairs: {', '.join(CUDA_PAIRS)}")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    pairs = {k: CUDA_PAIRS[k] for k in (args.pairs or CUDA_PAIRS)} if cuda else {"cpu-small": CPU_PAIR}
    batch, seq = args.batch or (8 if cuda else 4), args.seq or (1024 if cuda else 1024)

    if args.one:
        name, variant = args.one.split(":")
        try:
            print(json.dumps(run_variant(variant, pairs[name], batch, seq, args.steps)))
        except torch.OutOfMemoryError:
            print(json.dumps({"variant": variant, "error": "out of memory"}))
        except ImportError as err:
            print(json.dumps({"variant": variant, "error": f"not installed: {err.name}"}))
        return

    results = {"device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
               "torch": torch.__version__, "batch": batch, "seq": seq, "steps": args.steps, "pairs": {}}
    for name in pairs:
        rows = {}
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--one", f"{name}:{variant}", "--batch", str(batch), "--seq", str(seq),
                   "--steps", str(args.steps), *(["--pairs", *pairs] if cuda else [])]
            done = subprocess.run(cmd, capture_output=True, text=True)
            line = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
            rows[variant] = json.loads(line) if line.startswith("{") else {"error": done.stderr.strip()[-300:]}
            print(f"{name} {variant}: {rows[variant]}", file=sys.stderr, flush=True)
        sft, tf = rows.get("sft", {}).get("tokens_per_s"), rows.get("teacher_fwd", {}).get("tokens_per_s")
        if sft and tf:
            rows["ideal_online_kd_tokens_per_s"] = round(1 / (1 / sft + 1 / tf), 1)
        cached = rows.get("cached", {}).get("tokens_per_s")
        if sft and cached:
            rows["cached_vs_sft"] = round(cached / sft, 3)
        results["pairs"][name] = rows
    print(json.dumps(results))


if __name__ == "__main__":
    main()
