"""Tiny Qwen2-VL models and a processor built here, for tests: no hub, seconds on a CPU."""

from __future__ import annotations

from pathlib import Path


def tiny_vlm_config(hidden: int = 32, layers: int = 1, vision_depth: int = 1, vision_dim: int = 32,
                    patch_size: int = 8) -> dict:
    """hf_config of a Qwen2-VL with `hidden` wide, `layers` deep text model and a `vision_depth` vision tower; the
    vocabulary and placeholder ids come from the processor (kdkit fills them in)."""
    half = hidden // 2 // 2  # head_dim / 2 with 2 heads: M-RoPE sections (temporal, height, width) sum to it
    section = [half // 4, half // 4, half - 2 * (half // 4)]
    return {"model_type": "qwen2_vl",
            "text_config": {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_hidden_layers": layers,
                            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 512,
                            "rope_parameters": {"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}},
            "vision_config": {"depth": vision_depth, "embed_dim": vision_dim, "hidden_size": hidden, "num_heads": 2,
                              "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2}}


def save_tiny_vlm(directory: Path, processor_dir: Path, *, vocab_size: int | None = None, **kwargs) -> Path:
    """save_pretrained a tiny Qwen2-VL with the processor of `processor_dir` beside it: a local 'hub ID'.
    vocab_size: rows of its head (more than the tokenizer's: a padded head, as Qwen2-VL-7B's 152064)."""
    import torch

    from kdkit.config.schema import ModelConfig
    from kdkit.models.vlm import build_vlm, load_processor

    cfg = tiny_vlm_config(**kwargs)
    if vocab_size is not None:
        cfg["text_config"]["vocab_size"] = vocab_size
    spec = ModelConfig(hf_config=cfg, tokenizer=str(processor_dir))
    proc = load_processor(spec, "teacher")
    torch.manual_seed(0)
    model = build_vlm(spec, "teacher", processor=proc)
    model.save_pretrained(directory)
    proc.save(Path(directory))
    return Path(directory)
