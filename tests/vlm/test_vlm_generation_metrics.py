"""Generation-based metrics of task: vlm on a fixed tiny set: a stand-in model that answers from a fixed table, so
exact match, F1, answer length and the left-padded batched generation are known exactly."""

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_vlm_end_to_end as e2e  # noqa: E402

vlm_setup = e2e.vlm_setup  # its fixture: the tiny processor, data and teacher


class TableModel(nn.Module):
    """generate(): the prompt, then the tokens of `answers[i]` for the i-th prompt it sees per call, then EOS."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.w = nn.Linear(4, 4)
        self.tok, self.answers, self.calls = tokenizer, answers, 0

    def generate(self, input_ids, max_new_tokens, eos_token_id, pad_token_id, **kw):
        assert kw["pixel_values"].shape[0] == int(kw["image_grid_thw"].prod(-1).sum())
        rows = []
        for _ in range(input_ids.shape[0]):
            ids = self.tok(self.answers[self.calls % len(self.answers)], add_special_tokens=False)["input_ids"]
            self.calls += 1
            rows.append((ids + [eos_token_id])[:max_new_tokens] + [pad_token_id] * max_new_tokens)
        width = max_new_tokens
        return torch.cat([input_ids, torch.tensor([r[:width] for r in rows])], 1)


def test_exact_match_f1_and_answer_length_on_a_fixed_set(vlm_setup):
    from kdkit.tasks.vlm import VLMTask

    cfg, proc, data = e2e._data(vlm_setup)
    refs = [data.test.prompt(i)[1] for i in range(4)]
    answers = [refs[0], refs[1], "zebra", refs[3] + " extra"]  # 2 exact, 1 wrong, 1 partial
    model = TableModel(proc.tokenizer, answers)
    task = VLMTask()
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"generate_samples": 4, "max_new_tokens": 16,
                                                                     "batch_size": 4})})
    out = task._generation(cfg, model, data.test, torch.device("cpu"), proc, teacher=False)
    assert out["exact_match"] == 50.0 and out["answered"] == 4
    assert 50.0 < out["f1"] < 100.0  # the partial answer scores 2/3 F1 per single-word reference
    lengths = [len(proc.tokenizer(a, add_special_tokens=False)["input_ids"]) + 1 for a in answers]
    assert out["avg_new_tokens"] == round(sum(min(n, 16) for n in lengths) / 4, 2)
    assert out["latency_ms"] > 0 and out["throughput"] > 0 and out["params"] == 20


def test_left_pad_aligns_prompts_at_the_end():
    from kdkit.tasks.vlm import left_pad

    a = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "mm_token_type_ids": torch.tensor([[0, 1, 0]])}
    b = {"input_ids": torch.tensor([[4]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "mm_token_type_ids": torch.tensor([[0]])}
    out = left_pad([a, b], pad=9)
    assert out["input_ids"].tolist() == [[1, 2, 3], [9, 9, 4]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["mm_token_type_ids"].tolist() == [[0, 1, 0], [0, 0, 0]]
