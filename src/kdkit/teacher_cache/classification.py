"""Image-classification teacher caches: the teacher's full logits on K augmented views of every training image.

A shard holds, for its samples in dataset order: "logits" float16 (n, K, C), the teacher's logits on view v of
sample i, and "seeds" int64 (n, K), the seed that view's augmentation was drawn from
(`kdkit.data.augment.augment_views`: a sample's view is a pure function of its pixels and its seed, whatever
batch it is in). Training from the cache shows the student view `epoch % K` of each sample, augmented from the
stored seed: exactly the pixels the teacher scored (consistent teaching), so K views give K epochs of fresh
augmentation before they repeat. All K views are augmented (none is the clean image: online distillation never
shows the clean image either); with augmentation off every view would be the same image, so K is 1. Bytes per image:
K (2 C + 8), e.g. 112 for 4 views of 10 classes, 8,032 for 4 views of 1000.

Full logits (not top-k) keep every loss available (KD at any temperature, DKD); the key's settings are what the
views depend on: the augmentation (data.augment), the view rule's version and K.
"""

from __future__ import annotations

import hashlib

import torch

from kdkit.data.augment import augment_enabled, augment_views
from kdkit.errors import DataError, UserError

VIEW_RULE = 1  # bump when augment_views or view_seeds change what a seed means


def view_seeds(seed: int, index: torch.Tensor, views: int) -> torch.Tensor:
    """(n,) training-sample indices -> (n, K) int64: the seed of view v of sample i, from (run seed, i, v)."""
    out = [[int.from_bytes(hashlib.sha256(f"kdkit/view/{seed}/{i}/{v}".encode()).digest()[:8], "little", signed=True)
            for v in range(views)] for i in index.tolist()]
    return torch.tensor(out, dtype=torch.int64).view(len(out), views)


def settings(cfg) -> dict:
    """What the stored views depend on (compared by a run that trains from the cache, except `views`)."""
    views = cfg.cache.views if augment_enabled(cfg.data.augment) else 1
    return {"views": views, "augment": cfg.data.augment.model_dump(mode="json"), "view_rule": VIEW_RULE}


def make_classification_plan(cfg, task, data, teacher, device):
    from kdkit.data.loader import _BatchFetch
    from kdkit.teacher_cache.build import Plan, teacher_spec_hash

    s = settings(cfg)
    key = {"data": data.fingerprint, "settings": s, "teacher_spec": teacher_spec_hash(cfg.teacher),
           "teacher": task.teacher_fingerprint(teacher)}
    fetch = _BatchFetch(data.train)  # the pixels exactly as the training loader hands them over

    def write(start: int, end: int, advance):
        logits, seeds = [], []
        for a in range(start, end, cfg.eval.batch_size):
            index = list(range(a, min(a + cfg.eval.batch_size, end)))
            pixels = fetch[index]["pixels"].to(device)
            seed = view_seeds(cfg.seed, torch.tensor(index), s["views"])  # (b, K)
            out = torch.stack([teacher(augment_views(pixels, seed[:, v], cfg.data.augment))
                               for v in range(s["views"])], 1)  # (b, K, C)
            half = out.to(torch.float16)
            if not torch.isfinite(half).all():
                bad = index[int((~torch.isfinite(half)).flatten(1).any(1).nonzero()[0])]
                raise UserError(f"teacher: its logits on training sample {bad} do not fit float16 (|logit| > 65504 "
                                "or not finite); a cache cannot store them")
            logits.append(half.cpu())
            seeds.append(seed)
            advance(len(index))
        return {"logits": torch.cat(logits), "seeds": torch.cat(seeds)}, end - start

    def extra() -> dict:
        """The teacher's test-set predictions, in order: a run from the cache reports the student's agreement."""
        from kdkit.data import make_loader

        loader = make_loader(data.test, batch_size=cfg.eval.batch_size, shuffle=False, seed=cfg.seed)
        preds = [teacher(batch["pixels"].to(device)).argmax(-1).cpu() for batch in loader]
        return {"teacher_test_predictions": torch.cat(preds).tolist() if preds else []}

    return Plan("classification", key, len(data.train), "image", write, extra)


class StoredPredictions:
    """A stand-in reference for `classification_quality`: the cached teacher's test predictions, handed out batch by
    batch in the (unshuffled) test loader's order, as one-hot logits."""

    def __init__(self, predictions: list[int], num_classes: int):
        self.predictions, self.num_classes, self.at = torch.tensor(predictions, dtype=torch.long), num_classes, 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        chunk = self.predictions[self.at:self.at + len(pixels)]
        self.at += len(pixels)
        return torch.nn.functional.one_hot(chunk, self.num_classes).float()


class CachedClassifierTeacher:
    """Stands in for the teacher when training from a cache: a batch's view seeds and the teacher's logits on them.

    Holds one view at a time: the (seeds, logits) of every sample for view `epoch % K`, filled shard by shard as
    batches ask for them (each shard's sha256 is checked when it is read), so memory is N (2 C + 8) bytes whatever
    K is, plus the reader's two shards in flight.
    """

    cached = True

    def __init__(self, reader):
        self.reader = reader
        self.settings = reader.key["settings"]
        self.views = int(self.settings["views"])
        self._view: int | None = None

    @property
    def fingerprint(self) -> str:
        """The teacher's weights and the stored views: resuming across caches of other views (or online) is refused."""
        key = self.reader.key
        return hashlib.sha256(f"{key['teacher']}/{key['settings']}".encode()).hexdigest()[:16]

    def lookup(self, index: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(seeds int64 (B,), logits float32 (B, C)) of training samples `index` for the view of `epoch`."""
        view = epoch % self.views
        if view != self._view:
            self._view, self._seeds, self._logits = view, None, None
            self._have = torch.zeros(len(self.reader.manifest["shards"]), dtype=torch.bool)
        index = index.detach().cpu().long()
        if len(index) and (int(index.min()) < 0 or int(index.max()) >= self.reader.num_samples):
            raise DataError(f"{self.reader.dir}: training samples {index.tolist()} are not all in the cache "
                            f"({self.reader.num_samples} samples)")
        for i in torch.unique(index // self.reader.shard_samples).tolist():
            if not self._have[i]:
                self._fill(i)
        return self._seeds[index], self._logits[index].float()

    def _fill(self, i: int) -> None:
        shard = self.reader.shard(i)
        record = self.reader.manifest["shards"][i]
        logits, seeds = shard["logits"], shard["seeds"]
        if logits.shape[0] != record["end"] - record["start"] or logits.shape[1] != self.views:
            raise DataError(f"{self.reader.dir / record['file']}: holds logits of shape {tuple(logits.shape)}, not "
                            f"({record['end'] - record['start']}, {self.views}, classes)")
        if self._logits is None:
            self._logits = torch.empty(self.reader.num_samples, logits.shape[2], dtype=torch.float16)
            self._seeds = torch.empty(self.reader.num_samples, dtype=torch.int64)
        self._logits[record["start"]:record["end"]] = logits[:, self._view]
        self._seeds[record["start"]:record["end"]] = seeds[:, self._view]
        self._have[i] = True
