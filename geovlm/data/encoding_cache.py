"""Processor encodings of samples, kept so that a sample drawn again is not encoded again.

Encoding one sample (chat template, image resize and patching, tokenizer) costs about a
millisecond on the CPU, mostly in the processor's argument handling, and a run encodes the same
samples over and over: SFT draws 32 samples a step from a list in which task weights repeat
samples (the tiny preset: 25 600 draws of 7 800 samples, detection samples 16 times each), GRPO
draws its prompts again every epoch, and every held-out evaluation encodes the same test prompts.
On the 2-core default run that was about 40 s of the SFT stage's 150 s.

``EncodingCache.get(processor, sample, kind, extra, encode)`` returns ``encode()``'s dict the
first time and the same dict after, while

* the processor is the same object (its identity, pixel budget and chat template are the key);
* the sample is the same object with the same prompt, response and images (a sample edited in
  place is encoded again: its prompt, response and image identities are checked on every hit);
* ``kind`` and ``extra`` (the system prompt) are the same.

The pixel tensors of samples that show the same images (the tasks of one scene) are shared, and
the cache holds at most ``max_bytes`` (least recently used entries go first), so a dataset of
any size costs bounded memory. Callers must not modify the returned tensors (``_pad_batch``
copies them into the batch).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from geovlm.data.schema import Sample

Encoding = dict[str, torch.Tensor]
PIXEL_KEY = "pixel_values"
DEFAULT_MAX_BYTES = 1 << 30


def _image_key(image: Any) -> Hashable:
    """A path names its file; an in-memory image is the object itself (the cache holds the
    sample, hence the image, so its ``id`` is not reused while the entry lives)."""
    if isinstance(image, (str, Path)):
        return ("path", str(image))
    return ("object", id(image))


def sample_fingerprint(sample: Sample, response: str | None) -> tuple:
    """What an encoding of ``sample`` depends on besides the processor."""
    return (sample.prompt, response, tuple(_image_key(image) for image in sample.images))


@dataclass
class _Entry:
    processor: Any  # held so that ``id(processor)`` in the key stays this processor's
    sample: Sample  # held so that ``id(sample)`` stays this sample's
    fingerprint: tuple
    encoding: Encoding
    pixel_key: Hashable | None
    nbytes: int  # the encoding's own tensors (its pixels are counted once per pixel key)


class EncodingCache:
    """Least-recently-used cache of per-sample processor encodings (see the module docstring).

    Args:
        max_bytes: bound on the tensors held (pixels counted once however many samples share
            them); 0 disables the cache.
    """

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        # pixel key -> [shared pixel tensor, number of entries using it]
        self._pixels: dict[Hashable, list] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._pixels.clear()
        self.nbytes = 0

    def resize(self, max_bytes: int) -> None:
        """A new bound (0 disables the cache); entries over it are dropped, oldest first."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._evict()

    def get(
        self,
        processor,
        sample: Sample,
        kind: str,
        extra: Hashable,
        response: str | None,
        budget: tuple[int, int],
        encode: Callable[[], Encoding],
    ) -> Encoding:
        """``encode()`` for ``sample`` under ``processor``, computed once while cached.

        ``kind`` names the encoding ("sft", "prompt"), ``extra`` any other input it depends on
        (the system prompt), ``response`` the SFT response (None for a prompt), ``budget`` the
        processor's pixel budget.
        """
        if self.max_bytes == 0:
            return encode()
        template = getattr(processor, "chat_template", None)
        key = (id(processor), id(sample), kind, extra, budget, template)
        fingerprint = sample_fingerprint(sample, response)
        entry = self._entries.get(key)
        if entry is not None and entry.fingerprint == fingerprint:
            self._entries.move_to_end(key)
            self.hits += 1
            return entry.encoding
        if entry is not None:
            self._drop(key)
        self.misses += 1
        encoding = encode()
        self._insert(key, _Entry(processor, sample, fingerprint, encoding, None, 0), budget)
        return encoding

    def _insert(self, key: tuple, entry: _Entry, budget: tuple[int, int]) -> None:
        encoding = entry.encoding
        if PIXEL_KEY in encoding:
            # Same processor, budget and images: the same pixels, whatever the text.
            entry.pixel_key = (key[0], budget, entry.fingerprint[2])
            shared = self._pixels.get(entry.pixel_key)
            if shared is None:
                shared = self._pixels[entry.pixel_key] = [encoding[PIXEL_KEY], 0]
                self.nbytes += encoding[PIXEL_KEY].nbytes
            encoding[PIXEL_KEY] = shared[0]
            shared[1] += 1
        entry.nbytes = sum(v.nbytes for k, v in encoding.items() if k != PIXEL_KEY)
        self.nbytes += entry.nbytes
        self._entries[key] = entry
        self._evict()

    def _evict(self) -> None:
        """Drop the least recently used entries until the tensors held fit ``max_bytes``."""
        while self.nbytes > self.max_bytes and self._entries:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key)
        self.nbytes -= entry.nbytes
        if entry.pixel_key is not None:
            shared = self._pixels[entry.pixel_key]
            shared[1] -= 1
            if shared[1] == 0:
                del self._pixels[entry.pixel_key]
                self.nbytes -= shared[0].nbytes


# The process's cache, used by ``geovlm.data.collate`` unless a caller passes its own; a run
# sizes it from ``data.encoding_cache_mb``, and background workers switch it off.
SHARED = EncodingCache()
