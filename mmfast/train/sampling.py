"""Contrastive batches over a mixture of subsets: seeded, deterministic per epoch, weighted, optionally
task-homogeneous, and laid out for data-parallel training under accelerate.

Per-device batch and global batch
---------------------------------
`batch_size` is the contrastive batch of ONE device (`--per_device_train_batch_size`). Under
accelerate (what `transformers.Trainer` prepares its dataloader with) a batch sampler is wrapped in
`BatchSamplerShard(split_batches=False)`: rank r takes batches r, r + R, r + 2R, ... of this sampler.
So R consecutive batches, a *round*, make one step's global batch of R × batch_size rows (what
cross-device negatives see). Pass `num_replicas=R` (the world size) and every round

- holds no example twice (a duplicate across ranks would be a false negative), when a subset has at
  least R × batch_size examples;
- comes from a single subset when `homogeneous=True`, on every rank (VLM2Vec v2's task-homogeneous
  batches: the negatives of a step are all of one task);
- is complete: an epoch holds a whole number of rounds, so accelerate never pads the epoch's end by
  looping back to its start.

With one process, a round is a batch. (With accelerate's `split_batches=True` each batch is cut into R
slices instead: then pass the global batch as `batch_size` and `num_replicas=1`.)

Epochs
------
An epoch is a pure function of (seed, epoch): `set_epoch(e)` before iterating, as the Trainer does,
and a resumed run replays the same batches. Three modes:

- natural shuffle (no weights, not homogeneous): one permutation of all examples, cut into batches;
  every example once per epoch;
- natural homogeneous (no weights): each subset shuffled and cut into rounds, the rounds shuffled;
  every example at most once per epoch;
- weighted: `num_batches` batches (default: one pass over the subsets of weight > 0), each round's
  subset (homogeneous) or each row's subset (mixed) drawn in proportion to its weight, rows taken
  from a per-subset stream of fresh permutations (an up-weighted subset repeats across the epoch,
  never within a round unless it is smaller than a round).

`drop_last=True` (the default) drops the incomplete last batch: a small contrastive batch has few
negatives and spikes the loss.

Who calls `set_epoch` (transformers 5.24, accelerate 1.15): the Trainer reaches this sampler through
accelerate's `BatchSamplerShard` at each epoch's start. When a run resumes in the middle of an epoch
with more than one process, the dataloader is wrapped once more (`SkipBatchSampler` over
`BatchSamplerShard`) and that call no longer arrives; the trainer must then call `set_epoch` itself
(keep a reference to the sampler). With one process it arrives either way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class Concatenation(Sequence[T]):
    """Sequences one after another, indexed without copying them (a subset may be millions of rows
    read from disk when indexed)."""

    def __init__(self, parts: Sequence[Sequence[T]]):
        self.parts = tuple(parts)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self[i] for i in range(start, stop, step)]
            out = []  # each part's stretch sliced at once (a part reads a slice by chunk of rows)
            for part, first in zip(self.parts, self.starts[:-1].tolist(), strict=True):
                if first < stop and start < first + len(part):
                    out.extend(part[max(start - first, 0) : min(stop - first, len(part))])
            return out
        index = int(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        part = int(np.searchsorted(self.starts, index, side="right")) - 1
        return self.parts[part][index - int(self.starts[part])]


@dataclass(frozen=True)
class Mixture(Generic[T]):
    """Subsets concatenated in order into one indexable sequence (the dataset's index space), with
    their sampling weights (normalised; None = in proportion to their sizes)."""

    items: Sequence[T]
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    weights: tuple[float, ...] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> T:
        return self.items[index]

    @property
    def offsets(self) -> tuple[int, ...]:
        """Index of each subset's first item (the batch sampler draws each subset's rows from it; mmfast-mine
        walks the subsets by it)."""
        return tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))


def mixture(subsets: Mapping[str, Sequence[T]], weights: Mapping[str, float] | None = None) -> Mixture[T]:
    """Concatenates subsets {name: items}. `weights` {name: w >= 0} gives each subset's sampling
    weight (every name needs one); None samples in proportion to size."""
    if not subsets:
        raise ValueError("mixture: no subsets given")
    names = tuple(subsets)
    for name in names:
        if len(subsets[name]) == 0:
            raise ValueError(
                f"mixture: subset {name!r} has no examples (were all its rows skipped? see the data report)"
            )
    normalised = None
    if weights is not None:
        missing, unknown = set(names) - set(weights), set(weights) - set(names)
        if missing or unknown:
            raise ValueError(
                f"mixture weights must name exactly the subsets {sorted(names)}: "
                f"missing {sorted(missing)}, unknown {sorted(unknown)}"
            )
        raw = []
        for name in names:
            w = weights[name]
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"mixture: the weight of subset {name!r} must be a finite number >= 0, got {w!r}")
            raw.append(float(w))
        if sum(raw) <= 0:
            raise ValueError("mixture: at least one subset needs a weight > 0")
        normalised = tuple(w / sum(raw) for w in raw)
    items = Concatenation([subsets[name] for name in names])
    return Mixture(items, names, tuple(len(subsets[n]) for n in names), normalised)


class _Stream:
    """Endless rows of one subset: fresh permutations back to back; take(n) keeps its n rows
    distinct whenever the subset has at least n rows."""

    def __init__(self, size: int, rng: np.random.Generator):
        self.size, self.rng, self.queue = size, rng, np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        parts = [self.queue[:n]]
        self.queue = self.queue[n:]
        need = n - len(parts[0])
        while need > 0:
            perm = self.rng.permutation(self.size)
            taken = np.concatenate(parts)
            if 0 < len(taken) < self.size:  # the rows already in this round go to the back
                clash = np.isin(perm, taken)
                perm = np.concatenate([perm[~clash], perm[clash]])
            parts.append(perm[:need])
            self.queue = perm[need:]
            need -= len(parts[-1])
        return np.concatenate(parts)


class ContrastiveBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields lists of dataset indices, `batch_size` per device step (see the module docstring).

    `source` is a `Mixture` (its sizes and weights) or the length of a single-subset dataset.
    """

    def __init__(
        self,
        source: Mixture | int,
        batch_size: int,
        *,
        homogeneous: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        num_batches: int | None = None,
    ):
        if isinstance(source, Mixture):
            names, sizes, weights, offsets = source.names, source.sizes, source.weights, source.offsets
        elif isinstance(source, int) and not isinstance(source, bool) and source > 0:
            names, sizes, weights, offsets = ("data",), (source,), None, (0,)
        else:
            raise TypeError(f"source must be a Mixture or a dataset length > 0, got {source!r}")
        for name, value in (("batch_size", batch_size), ("num_replicas", num_replicas)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.names, self.sizes, self.weights, self.offsets = names, sizes, weights, np.array(offsets)
        self.batch_size, self.drop_last, self.homogeneous = batch_size, bool(drop_last), bool(homogeneous)
        self.seed, self.num_replicas, self.epoch = seed, num_replicas, 0
        round_size = batch_size * num_replicas
        if homogeneous and not drop_last and num_replicas > 1:
            raise ValueError(
                "homogeneous batches with drop_last=False need num_replicas=1: a subset's partial last round "
                "would put batches of different subsets (and sizes) on the ranks of one step"
            )
        if homogeneous:
            active = [i for i in range(len(names)) if weights is None or weights[i] > 0]
            small = [f"{names[i]} ({sizes[i]})" for i in active if sizes[i] < round_size]
            if small and drop_last:
                raise ValueError(
                    f"homogeneous batches: subsets {', '.join(small)} hold fewer examples than one global batch "
                    f"(batch_size {batch_size} x {num_replicas} replicas = {round_size}), so they could never be "
                    "drawn; lower the batch size, or give them weight 0"
                )
        if weights is None:
            if num_batches is not None:
                raise ValueError(
                    "num_batches sets the epoch length of weighted sampling; these subsets have no weights"
                )
            groups = sizes if homogeneous else (sum(sizes),)  # cut per subset, or all at once
            if drop_last:
                self.num_batches = sum(n // round_size for n in groups) * num_replicas
            else:
                self.num_batches = sum(math.ceil(n / batch_size) for n in groups)
        else:
            active_rows = sum(n for n, w in zip(sizes, weights, strict=True) if w > 0)
            default = (active_rows // round_size) * num_replicas
            if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)):
                raise ValueError(f"num_batches must be an int, got {num_batches!r}")
            self.num_batches = default if num_batches is None else (num_batches // num_replicas) * num_replicas
        if self.num_batches < 1:
            raise ValueError(
                f"an epoch would hold no batch: {sum(sizes)} examples, batch_size {batch_size} x {num_replicas} "
                f"replicas (num_batches {num_batches})"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch, 0])
        if self.weights is None and not self.homogeneous:
            order = rng.permutation(sum(self.sizes))
            rounds = [
                order[i : i + self.batch_size * self.num_replicas]
                for i in range(0, len(order), self.batch_size * self.num_replicas)
            ]
        elif self.weights is None:
            rounds = self._natural_homogeneous_rounds(rng)
        else:
            rounds = self._weighted_rounds(rng)
        emitted = 0
        for members in rounds:
            for start in range(0, len(members), self.batch_size):
                batch = members[start : start + self.batch_size]
                if emitted == self.num_batches or (self.drop_last and len(batch) < self.batch_size):
                    return
                emitted += 1
                yield [int(i) for i in batch]

    def _natural_homogeneous_rounds(self, rng: np.random.Generator) -> list[np.ndarray]:
        round_size = self.batch_size * self.num_replicas
        full, tails = [], []
        for k, size in enumerate(self.sizes):
            perm = self.offsets[k] + np.random.default_rng([self.seed, self.epoch, 1 + k]).permutation(size)
            cut = (size // round_size) * round_size
            full += [perm[i : i + round_size] for i in range(0, cut, round_size)]
            if cut < size and not self.drop_last:
                tails.append(perm[cut:])
        # Partial rounds go last, so the full ones stay aligned across ranks.
        return [full[i] for i in rng.permutation(len(full))] + [tails[i] for i in rng.permutation(len(tails))]

    def _weighted_rounds(self, rng: np.random.Generator) -> Iterator[np.ndarray]:
        streams = [
            _Stream(size, np.random.default_rng([self.seed, self.epoch, 1 + k])) for k, size in enumerate(self.sizes)
        ]
        weights = np.asarray(self.weights)
        round_size = self.batch_size * self.num_replicas
        for _ in range(self.num_batches // self.num_replicas):
            if self.homogeneous:
                k = int(rng.choice(len(streams), p=weights))
                yield self.offsets[k] + streams[k].take(round_size)
            else:
                counts = rng.multinomial(round_size, weights)
                rows = np.concatenate([self.offsets[k] + streams[k].take(int(c)) for k, c in enumerate(counts) if c])
                yield rows[rng.permutation(round_size)]
