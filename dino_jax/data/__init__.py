"""Data: random-access sources (sources.py) and grain pipelines into canvases (pipeline.py)."""
from dino_jax.data.pipeline import (eval_batches, steps_per_epoch, to_canvas, train_dataset,
                                    train_iterator)
from dino_jax.data.sources import ArraySource, load

__all__ = ['ArraySource', 'eval_batches', 'load', 'steps_per_epoch', 'to_canvas',
           'train_dataset', 'train_iterator']
