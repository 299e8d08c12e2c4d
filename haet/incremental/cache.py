"""A byte-bounded cache of a frozen trunk's outputs, keyed by sample id.

The trunk is frozen, so a sample's feature map never changes: computing it once and reusing it
across epochs and updates removes the trunk from every training step (MoIL's feature-map
caching). The cache holds at most `max_bytes` of stored features; when full it evicts the least
recently used entries, and an evicted sample is recomputed (and counted) when next needed.
Features may be stored in bfloat16/float16 to fit twice as many; they are returned as float32.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from ..core.config import check_choice, check_range

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureCache:
    def __init__(self, max_bytes: int, dtype: str = "float32") -> None:
        check_range("cache max_bytes", max_bytes, 0)
        check_choice("cache dtype", dtype, DTYPES)
        self.max_bytes, self.dtype = int(max_bytes), DTYPES[dtype]
        self._store: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0
        self.trunk_samples = 0  # samples the trunk was run on through this cache

    def __len__(self) -> int:
        return len(self._store)

    def _put(self, key: int, feature: torch.Tensor) -> None:
        stored = feature.detach().to(self.dtype).clone()
        size = stored.numel() * stored.element_size()
        if size > self.max_bytes:
            return  # larger than the whole cache: never stored
        while self.bytes + size > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
            self.evictions += 1
        self._store[key] = stored
        self.bytes += size

    def features(self, trunk: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, ids: torch.Tensor,
                 batch_size: int = 256) -> torch.Tensor:
        """The trunk's outputs for samples `x` with ids `ids`, computing only those not cached."""
        keys = [int(i) for i in ids]
        out: list[torch.Tensor | None] = [None] * len(keys)
        missing = []
        for j, key in enumerate(keys):
            hit = self._store.get(key)
            if hit is None:
                missing.append(j)
            else:
                self._store.move_to_end(key)
                out[j] = hit.float()
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        with torch.no_grad():
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                computed = trunk(x[chunk])
                self.trunk_samples += len(chunk)
                for j, f in zip(chunk, computed):
                    self._put(keys[j], f)
                    # What training sees is what the cache stores (rounded when stored in 16 bits).
                    out[j] = f.to(self.dtype).float()
        return torch.stack(out) if out else torch.empty(0)
