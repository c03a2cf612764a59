"""A training loader that a checkpoint taken mid-epoch resumes where it stood.

Lightning saves a loader's place in its checkpoints only for a loader with ``state_dict`` /
``load_state_dict`` (and warns, on resuming mid-epoch, that a plain ``DataLoader`` is not resumable): a plain
loader restarts the epoch it was in, so the resumed run sees that epoch's first batches twice and its
shuffling generator starts afresh. :class:`ResumableLoader` is a ``DataLoader`` (same arguments, so Lightning
can rebuild it, e.g. with a ``DistributedSampler``) that keeps, per epoch, the state its shuffling generators
had when the epoch's iterator was made and the batches handed out since:

- resumed mid-epoch, it puts the generators back to that state (the epoch's order is drawn again, the same)
  and drops the batches the stopped run had trained on (loaded and dropped: only public DataLoader API);
- resumed from a checkpoint at an epoch's end, the next epoch starts from the generators' state there.

A resumed run draws the orders of the run that was not stopped, so both end with the same adapter: with
``num_workers=0`` (lorabench's default) and with worker processes (``persistent_workers``: one iterator for the
whole fit), whose iterator draws its workers' seed from the loader's generator each epoch as a new one does
(before 2026-12-07 only once, so a resumed run's orders differed after the first epoch). Random crops and flips
in worker processes draw from each worker's own generator, which PyTorch seeds from that seed: the training loader
(``ImageFolderDataModule.train_dataloader``) makes workers that augment non-persistent, so every epoch's workers
are seeded from the loader's generator, and a resumed run's draw what the stopped run's drew (persistent ones
carried their generators across epochs, which no checkpoint holds). A ``DistributedSampler``'s order comes from its
seed and epoch, which Lightning restores;
a sampler's own generator (the aspect-ratio buckets') and the dataset's (random crops and flips in the main
process, ``ImageCaptionDataset.generators``) are kept like the loader's.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import torch
from torch.utils.data import DataLoader


class ResumableLoader(DataLoader):
    """A ``DataLoader`` whose ``state_dict`` is its place in the epoch (see the module docstring)."""

    _epoch_start: Optional[list[torch.Tensor]] = None  # the generators' states as this epoch's iterator was made
    _handed_out = 0  # batches of this epoch handed out (Lightning prefetches none from a loader with a length)
    _to_load: Optional[dict[str, Any]] = None

    def _generators(self) -> list[torch.Generator]:
        """The generators this loader's batches are drawn from: its own (the shuffling sampler's and the workers'
        seed), its batch sampler's (the aspect-ratio buckets') and its dataset's (random crops and flips), each
        once."""
        found = [getattr(self, "generator", None), getattr(self.sampler, "generator", None),
                 getattr(self.batch_sampler, "generator", None), *getattr(self.dataset, "generators", ())]
        out: list[torch.Generator] = []
        for g in found:
            if isinstance(g, torch.Generator) and all(g is not h for h in out):
                out.append(g)
        return out

    def state_dict(self) -> dict[str, Any]:
        """Where the epoch stands: at its end (or before the first), the generators' states now and no batch
        handed out; mid-epoch, their states at the epoch's start and the batches handed out."""
        if self._epoch_start is None or self._handed_out >= len(self):
            return {"generator_states": [g.get_state() for g in self._generators()], "batches": 0}
        return {"generator_states": list(self._epoch_start), "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state`` (:meth:`state_dict`'s) when the next epoch's iterator is made."""
        self._to_load = dict(state)

    def __iter__(self) -> Iterator[Any]:
        state, self._to_load = self._to_load, None
        generators = self._generators()
        skip = 0
        # a checkpoint holds the states of the generators it had, in :meth:`_generators`' order: one written before
        # the dataset kept its own (crops and flips from the global generator) holds the loader's and sampler's
        if state is not None and len(state["generator_states"]) <= len(generators):
            for g, s in zip(generators, state["generator_states"]):
                g.set_state(s)
            skip = int(state["batches"])
        self._epoch_start = [g.get_state() for g in generators]
        self._handed_out = 0
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            # the workers' seed a new iterator draws from the loader's generator before its order (torch's
            # _BaseDataLoaderIter), drawn here as well by the iterator that goes on: every epoch's order then comes
            # after one such draw, whether its iterator is the fit's first (a resumed run's) or not
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        for batch in super().__iter__():
            self._handed_out += 1
            if self._handed_out > skip:
                yield batch
