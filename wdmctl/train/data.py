"""What each step reads: micro-batch k of a process is a pure function of (seed, k, rank).

Everything random in step s (which images, their posterior noise and flips, t, eps, the dropped labels)
comes from generators seeded by (train.seed, purpose, s, micro-batch, rank), never from iterator or global
RNG state: that is what makes resume exact without saving any RNG state. The image order is a seeded
permutation per epoch over a stream of `train.batch_size` images per step, so the same images are seen
whatever the number of processes.
"""

from __future__ import annotations

import numpy as np
import torch

from wdmctl.errors import WdmError

# purposes mixed into derived seeds, so the streams of one step never coincide
EPOCH_STREAM, DATA_STREAM, NOISE_STREAM = 1, 2, 3


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (numpy's SeedSequence hashing: no correlated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class StepBatches(torch.utils.data.Dataset):
    """Item k = micro-batch (step, micro) = divmod(k, grad_accum) of this process, as (step, micro, x, y).

    Global image stream: step s consumes positions [s * batch_size, (s + 1) * batch_size); position i is
    image perm_e[i mod N] of epoch e = i // N, perm_e a seeded permutation. Micro-batch m of rank r takes
    the slice starting at (m * world_size + r) * micro_batch. The dataset's own randomness (posterior noise,
    flips; torch's global RNG) is seeded per micro-batch, so DataLoader workers need no seeding either.
    """

    def __init__(self, dataset, batch_size: int, grad_accum: int, world_size: int, rank: int, seed: int):
        if batch_size % (grad_accum * world_size):
            raise WdmError(f"train.batch_size {batch_size} is not divisible by train.grad_accum ({grad_accum}) x "
                           f"processes ({world_size}); pick a batch size that splits evenly")
        self.dataset, self.batch_size, self.grad_accum = dataset, batch_size, grad_accum
        self.world_size, self.rank, self.seed = world_size, rank, seed
        self.micro_batch = batch_size // (grad_accum * world_size)
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:  # only a bound: the sampler says which items are read
        return 2 ** 62

    def _permutation(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, EPOCH_STREAM, epoch))
            perm = torch.randperm(len(self.dataset), generator=generator)
            self._perms = {epoch - 1: self._perms[epoch - 1]} if epoch - 1 in self._perms else {}
            self._perms[epoch] = perm
        return perm

    def indices(self, step: int, micro: int) -> list[int]:
        n = len(self.dataset)
        first = step * self.batch_size + (micro * self.world_size + self.rank) * self.micro_batch
        return [int(self._permutation(i // n)[i % n]) for i in range(first, first + self.micro_batch)]

    def __getitem__(self, k: int):
        step, micro = divmod(k, self.grad_accum)
        indices = self.indices(step, micro)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, DATA_STREAM, step, micro, self.rank))
            items = [self.dataset[i] for i in indices]
        x = torch.stack([item[0] for item in items])
        y = torch.stack([torch.as_tensor(item[1]) for item in items]).long()
        return step, micro, x, y
