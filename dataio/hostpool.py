"""Reusable CPU output buffers for loader batches.

NOTE: why. On the CPU a fresh 25-40 MB tensor per batch costs more than the work written into it:
glibc hands allocations above its mmap threshold (at most 32 MB) straight to the kernel, which
faults in and zeroes every page again (measured here: 23 ms to allocate and fill 40 MB, 3 ms to
fill it when reused). A buffer goes back into use only once nothing else holds its storage (the
consumer dropped the batch and every view of it), so reuse is never visible to a caller.
"""

from __future__ import annotations

import torch

# NOTE: private, but the only way to ask "does anyone else hold this storage?"; without it the
# pool just allocates afresh every time (correct, slower).
_use_count = getattr(torch._C, "_storage_Use_Count", None)


class HostPool:
    """A few CPU storages handed out as tensors and reused when released."""

    def __init__(self, capacity: int = 6) -> None:
        self.capacity = capacity
        self._storages: list[torch.UntypedStorage] = []

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if _use_count is not None:
            for storage in self._storages:
                if storage.nbytes() == nbytes and _use_count(storage._cdata) == 1:
                    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)
        tensor = torch.empty(shape, dtype=dtype)
        if _use_count is not None and nbytes:
            self._storages.append(tensor.untyped_storage())
            del self._storages[: -self.capacity]
        return tensor
