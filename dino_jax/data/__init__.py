"""Data: random-access sources (sources.py, folder.py, records.py), robust decoding
(decode.py), grain pipelines into canvases (pipeline.py) and `python -m dino_jax.data.prepare`."""
from dino_jax.data.pipeline import (TrainIterator, check_source, eval_batches, steps_per_epoch,
                                    to_canvas, train_dataset, train_iterator)
from dino_jax.data.sources import ArraySource, DataError, load

__all__ = ['ArraySource', 'DataError', 'TrainIterator', 'check_source', 'eval_batches', 'load',
           'steps_per_epoch', 'to_canvas', 'train_dataset', 'train_iterator']
