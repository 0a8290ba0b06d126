"""Data: DataError and the Source protocol (base.py), random-access sources (sources.py,
folder.py, records.py), robust decoding (decode.py), grain pipelines into canvases
(pipeline.py) and `python -m dino_jax.data.prepare`."""
from dino_jax.data.base import DataError, Source
from dino_jax.data.pipeline import (TrainIterator, check_source, eval_batches, steps_per_epoch,
                                    to_canvas, train_dataset, train_iterator)
from dino_jax.data.sources import ArraySource, load

__all__ = ['ArraySource', 'DataError', 'Source', 'TrainIterator', 'check_source', 'eval_batches',
           'load', 'steps_per_epoch', 'to_canvas', 'train_dataset', 'train_iterator']
