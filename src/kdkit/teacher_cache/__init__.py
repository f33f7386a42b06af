"""Offline teacher outputs: `kdkit cache CONFIG` runs the teacher once over the training split and stores what the
losses need (kdkit.teacher_cache.store for the format, kdkit.teacher_cache.lm (task lm and vlm) /
kdkit.teacher_cache.classification for what each task keeps); `teacher: {cache: DIR}` trains from it without loading
the teacher."""

from kdkit.teacher_cache.store import CacheReader, CacheWriter

__all__ = ["CacheReader", "CacheWriter"]
