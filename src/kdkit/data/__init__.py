"""Image data: sources (Fashion-MNIST, digits, image folders, Hugging Face, JSON Lines manifests), seeded splits,
loaders, augmentation.

Every dataset item is (image uint8 (C, H, W), label int); a loader batch is {"pixels": float32 (B, C, H, W) in
[0, 1], "labels": int64 (B,), "index": int64 (B,)}.
"""

from kdkit.data.augment import augment_batch, preprocess
from kdkit.data.build import ImageData, build_image_data
from kdkit.data.datasets import FileImageDataset, TensorImageDataset
from kdkit.data.loader import collate, epoch_order, make_loader, num_batches

__all__ = ["FileImageDataset", "ImageData", "TensorImageDataset", "augment_batch", "build_image_data", "collate",
           "epoch_order", "make_loader", "num_batches", "preprocess"]

# Text data for task: lm (build_text_data, TextData, TextDataset)
from kdkit.data.text import TextData, TextDataset, build_text_data, tokenizer_fingerprint  # noqa: E402

__all__ += ["TextData", "TextDataset", "build_text_data", "tokenizer_fingerprint"]
