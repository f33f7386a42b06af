"""Procedural images of shapes with questions and answers (the vision-language demo's data), and the tiny
Qwen2-VL-style processor the demo's models read them with. Deterministic by seed; no download.

Each image (size x size pixels, RGB) holds 1 to 4 shapes (circle, square, triangle; red, green, blue, yellow), one
per quadrant at most, jittered inside it; each image gets one question about counts, colours, kinds or positions,
answered in one or two words:

    python -m kdkit.data.shapes OUT_DIR [--n 4000] [--seed 0] [--size 48]    # OUT_DIR/data.jsonl + OUT_DIR/images/
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

KINDS = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("zero", "one", "two", "three", "four")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def scene(rng: random.Random) -> list[dict]:
    """1-4 shapes, each {kind, colour, position}, in distinct quadrants."""
    cells = rng.sample(range(4), rng.randint(1, 4))
    return [{"kind": rng.choice(KINDS), "colour": rng.choice(list(COLOURS)), "position": POSITIONS[c]} for c in cells]


def draw(shapes: list[dict], size: int, rng: random.Random):
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size), (245, 245, 240))
    d = ImageDraw.Draw(img)
    half = size // 2
    for s in shapes:
        c = POSITIONS.index(s["position"])
        x0, y0 = (c % 2) * half, (c // 2) * half
        r = rng.randint(half * 3 // 10, half * 4 // 10)
        cx = x0 + rng.randint(r + 1, half - r - 1)
        cy = y0 + rng.randint(r + 1, half - r - 1)
        fill = COLOURS[s["colour"]]
        if s["kind"] == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif s["kind"] == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def question(shapes: list[dict], rng: random.Random) -> tuple[str, str]:
    """One question about the scene and its answer."""
    kinds = [s["kind"] for s in shapes]
    options = ["count", "colour_count", "where", "what_at", "is_there"]
    unique = [s for s in shapes if kinds.count(s["kind"]) == 1]
    if unique:
        options.append("colour_of")
    kind = rng.choice(options)
    if kind == "count":
        return "How many shapes are there?", NUMBERS[len(shapes)]
    if kind == "colour_count":
        colour = rng.choice(list(COLOURS))
        return f"How many {colour} shapes are there?", NUMBERS[sum(s["colour"] == colour for s in shapes)]
    if kind == "where":
        s = rng.choice(shapes)
        return f"Where is the {s['colour']} {s['kind']}?", s["position"] if sum(
            t["colour"] == s["colour"] and t["kind"] == s["kind"] for t in shapes) == 1 else "several places"
    if kind == "what_at":
        pos = rng.choice(POSITIONS)
        found = [s for s in shapes if s["position"] == pos]
        return f"What shape is in the {pos}?", found[0]["kind"] if found else "nothing"
    if kind == "is_there":
        colour, k = rng.choice(list(COLOURS)), rng.choice(KINDS)
        yes = any(s["colour"] == colour and s["kind"] == k for s in shapes)
        return f"Is there a {colour} {k}?", "yes" if yes else "no"
    s = rng.choice(unique)
    return f"What colour is the {s['kind']}?", s["colour"]


def generate(out_dir: str | Path, n: int = 4000, seed: int = 0, size: int = 48) -> Path:
    """Write n images and OUT/data.jsonl ({image, question, answer} per line); returns the jsonl path. Idempotent:
    an existing complete set with the same settings is kept."""
    out = Path(out_dir)
    manifest = out / "data.jsonl"
    stamp = out / "settings.json"
    settings = {"n": n, "seed": seed, "size": size, "version": 1}
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return manifest
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        shapes = scene(rng)
        name = f"images/{i:05d}.png"
        draw(shapes, size, rng).save(out / name)
        q, a = question(shapes, rng)
        lines.append(json.dumps({"image": name, "question": q, "answer": a}))
    manifest.write_text("\n".join(lines) + "\n")
    stamp.write_text(json.dumps(settings))
    return manifest


def corpus() -> list[str]:
    """Every word the questions and answers use, for training the demo's tokenizer."""
    rng = random.Random(1)
    texts = []
    for _ in range(2000):
        q, a = question(scene(rng), rng)
        texts += [q, a]
    return texts + ["user", "assistant", "system", "\n"]


def build_processor(directory: str | Path, *, texts: Optional[list[str]] = None, vocab_size: int = 320,
                    patch_size: int = 8, merge_size: int = 2, min_pixels: int = 32 * 32,
                    max_pixels: int = 64 * 64) -> Path:
    """A Qwen2-VL-style processor built here: a byte-level BPE tokenizer trained on `texts` (default: the shapes
    questions) with Qwen2-VL's special tokens, a Qwen2VLImageProcessor with small patches, and a chat template;
    saved so kdkit.models.vlm.load_processor (and AutoProcessor, where torchvision is installed) loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from kdkit.models.vlm import VLMProcessor

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts or corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)
    images = Qwen2VLImageProcessorPil(patch_size=patch_size, merge_size=merge_size, temporal_patch_size=2,
                                      min_pixels=min_pixels, max_pixels=max_pixels)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    VLMProcessor(fast, images, chat_template=CHAT_TEMPLATE).save(out)
    return out


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=48)
    a = p.parse_args()
    print(generate(a.out, a.n, a.seed, a.size))
