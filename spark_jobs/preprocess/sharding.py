"""Which split and which shard each input file goes to: pure functions of its relative path.

Used on the driver, on the executors, by the tests and by bench/spark_preprocess.py (no Spark).
"""
from __future__ import annotations

import dataclasses
import hashlib

SPLITS = ("train", "val")


def unit_hash(text: str) -> float:
    """A stable hash of `text` mapped to [0, 1)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64


def shard_key(rel: str) -> str:
    """Sort key of a file inside its split: 16 hex digits of a hash of its relative path."""
    return hashlib.sha256(("shard:" + rel).encode("utf-8")).hexdigest()[:16]


def key_unit(key: str) -> float:
    """A shard key (hex) as a number in [0, 1]: where the file falls in its split's shards."""
    return int(key, 16) / 16.0 ** len(key)


def assign(rel: str, *, derived_val: bool, val_fraction: float, seed: int,
           val_labels: dict[str, str] | None = None) -> tuple[str, str | None]:
    """(split, class folder or None) of a path relative to the input root ("train/cls/x.jpg").
    With `derived_val`, a train/ file goes to "val" by a seeded hash of its path, so adding files
    does not reshuffle the rest. With `val_labels` ({file name directly in val/: class}, a flat
    val/ with --val-labels), "val/<name>" is ("val", its label, or None when it has none)."""
    parts = rel.split("/")
    top = parts[0]
    if val_labels is not None and top == "val" and len(parts) == 2:
        return "val", val_labels.get(parts[1])
    cls = parts[1] if len(parts) >= 3 else None
    split = top
    if derived_val and top == "train":
        if unit_hash(f"val-split:{seed}:{'/'.join(parts[1:])}") < val_fraction:
            split = "val"
    return split, cls

@dataclasses.dataclass(frozen=True)
class ShardPlan:
    splits: tuple[str, ...]
    counts: tuple[int, ...]     # shards per split
    offsets: tuple[int, ...]    # first partition of each split

    @classmethod
    def of(cls, splits: tuple[str, ...], counts: tuple[int, ...]) -> "ShardPlan":
        """The plan of ``counts`` shards per split, the partitions of each split after the last's."""
        return cls(tuple(splits), tuple(counts), tuple(sum(counts[:i]) for i in range(len(counts))))

    @property
    def total(self) -> int:
        return sum(self.counts)

    def place(self, split: str, key: str) -> tuple[int, float]:
        """(partition of a file, its key's position in that shard's range of keys, in [0, 1])."""
        i = self.splits.index(split)
        x = key_unit(key) * self.counts[i]
        shard = min(int(x), self.counts[i] - 1)
        return self.offsets[i] + shard, x - shard

    def partition(self, split: str, key: str) -> int:
        return self.place(split, key)[0]

    def shard_of(self, p: int) -> tuple[str, int, int]:
        for split, off, n in zip(self.splits, self.offsets, self.counts):
            if off <= p < off + n:
                return split, p - off, n
        raise IndexError(p)
