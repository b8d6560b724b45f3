"""The frozen vision tower's output per image, computed once.

With ``model.freeze_vision`` (the tiny preset) the tower and its merger do not change during
the stages, yet every SFT step, every GRPO pass (rollout prefill, policy and reference
forwards) and every held-out evaluation runs the tower again on the same images: on the tiny
CPU model ~23 ms of a ~180 ms SFT step, for images the run has encoded before.

``cache_frozen_vision(model)`` (the one patch, applied by ``geovlm.model`` to a CPU policy with
a frozen tower) wraps the tower's ``forward``: the batch's images are told apart by their grid
and an xxh3-128 digest of their patch bytes, images seen before take their stored outputs, and
only the others run through the tower (in one call). The stored outputs are those of the tower
as it is: the key includes every tower parameter's identity and in-place version counter, so
loading or training the tower (the vision pretraining) makes a new key. The tower runs uncached
while any of its parameters is trainable (in-place writes through ``.data``, as adapter merges
do, bump no version counter: only a tower nothing trains is cached), on CUDA tensors (hashing
would copy them to the host), and with keyword arguments the cache does not know.

Each image's output does not depend on the other images of its batch (attention is per image,
and the tower's matmuls give the same rows whatever the batch; the tests check it bitwise), so
a cached run computes what an uncached run computes.

Shapes: ``pixel_values`` ``[sum of patches, C * temporal_patch * patch * patch]``,
``grid_thw`` ``[images, 3]``; the tower returns the merged embeddings ``[sum of patches / m^2,
hidden]`` as a tensor (older transformers) or as ``pooler_output`` of a
``BaseModelOutputWithPooling`` whose ``last_hidden_state`` ``[sum of patches, vision hidden]``
is per image too (in each image's window order).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import xxhash

# ~24 KB an image on the tiny model (merged + per-patch outputs); a run holds ~2 000.
DEFAULT_MAX_IMAGES = 8192


def _digest(patches: torch.Tensor) -> bytes:
    # The raw bytes (numpy has no bfloat16).
    return xxhash.xxh3_128_digest(patches.contiguous().view(torch.uint8).numpy())


class FrozenVisionCache:
    """LRU store of one tower's outputs per image (see the module docstring).

    Attributes: ``hits`` / ``misses`` count images; ``max_images`` bounds the store.
    """

    def __init__(self, visual: torch.nn.Module, max_images: int = DEFAULT_MAX_IMAGES):
        self.visual = visual
        self.max_images = max_images
        self.hits = 0
        self.misses = 0
        self._store: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.output_type: type | None = None  # the tower's output class (None: a tensor)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        """The tower's own forward (its class's: the instance's ``forward`` is this cache)."""
        return type(self.visual).forward(self.visual, pixel_values, grid_thw=grid_thw, **kwargs)

    def __deepcopy__(self, memo: dict) -> FrozenVisionCache:
        # A copied model (the GRPO reference) gets an empty cache of its own tower.
        return FrozenVisionCache(copy.deepcopy(self.visual, memo), self.max_images)

    def _weights_key(self) -> tuple:
        tensors = [*self.visual.parameters(), *self.visual.buffers()]
        return tuple((id(t), t._version) for t in tensors)

    def _bypass(self, pixel_values: torch.Tensor, kwargs: dict) -> bool:
        # A tower with any trainable parameter (adapters, an unfrozen tower) is not frozen: its
        # output may change without a new key (a merge or a toggle writes no version counter).
        return (
            bool(kwargs)
            or pixel_values.device.type != "cpu"
            or any(p.requires_grad for p in self.visual.parameters())
        )

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any):
        if self._bypass(pixel_values, kwargs):
            return self.forward(pixel_values, grid_thw=grid_thw, **kwargs)
        patches = grid_thw.prod(dim=-1).tolist()
        chunks = pixel_values.split(patches)
        weights = self._weights_key()
        keys = [
            (weights, tuple(grid.tolist()), str(chunk.dtype), _digest(chunk))
            for chunk, grid in zip(chunks, grid_thw, strict=True)
        ]
        todo: dict[tuple, int] = {}  # images not stored: key -> its first index in the batch
        for i, key in enumerate(keys):
            if key not in self._store and key not in todo:
                todo[key] = i
        if todo:
            index = list(todo.values())
            out = self.forward(torch.cat([chunks[i] for i in index]), grid_thw=grid_thw[index])
            self._add(list(todo), out, [patches[i] for i in index])
        self.misses += len(todo)
        self.hits += len(keys) - len(todo)
        entries = []
        for key in keys:
            self._store.move_to_end(key)
            entries.append(self._store[key])
        while len(self._store) > self.max_images:
            self._store.popitem(last=False)
        merged = torch.cat([m for m, _ in entries])
        if self.output_type is None:
            return merged
        return self.output_type(
            last_hidden_state=torch.cat([h for _, h in entries]), pooler_output=merged
        )

    def _add(self, keys: list[tuple], out, patches: list[int]) -> None:
        """Store the per-image pieces of one tower call over the images of ``keys``."""
        if isinstance(out, torch.Tensor):
            self.output_type, merged, hidden = None, out, None
        else:
            self.output_type, merged, hidden = type(out), out.pooler_output, out.last_hidden_state
        merge = int(self.visual.spatial_merge_size) ** 2
        merged_parts = merged.split([n // merge for n in patches])
        hidden_parts = hidden.split(patches) if hidden is not None else [None] * len(keys)
        for key, m, h in zip(keys, merged_parts, hidden_parts, strict=True):
            self._store[key] = (m, h)


def cache_frozen_vision(model: torch.nn.Module, max_images: int = DEFAULT_MAX_IMAGES) -> bool:
    """Serve ``model``'s vision tower from a ``FrozenVisionCache`` (once per tower; see the
    module docstring). Returns whether the tower is cached now."""
    from geovlm.model import unwrap

    visual = getattr(getattr(unwrap(model), "model", None), "visual", None)
    if visual is None or not hasattr(visual, "spatial_merge_size"):
        return False
    if next(visual.parameters()).device.type != "cpu":
        return False  # keys hash the patches on the host: not worth a copy from the GPU
    if not isinstance(visual.forward, FrozenVisionCache):
        visual.forward = FrozenVisionCache(visual, max_images)
    return True
