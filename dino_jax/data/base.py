"""What every data module shares: DataError and the Source protocol.

A Source is random access over records: len(source), source[i] -> a dict holding 'label' (an
int, -1 when the data has none) and the image as 'image' (a decoded uint8 array), 'encoded'
(file bytes) or 'path' (a file to read), with 'path' also naming where the record came from
and 'error' saying why it could not be read; `has_labels` says whether labels are real.
sources.py, folder.py and records.py implement it; pipeline.py consumes it.
"""
from __future__ import annotations

from typing import Protocol

from dino_jax.errors import DinoJaxError


class DataError(DinoJaxError, ValueError):
  """The data cannot train: an empty or unreadable dataset, or one smaller than a batch."""


class Source(Protocol):
  has_labels: bool

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict: ...
