"""dino_jax: DINO / DINOv2 self-supervised ViT training in JAX and Flax."""
__version__ = '0.1.0'


def __getattr__(name):  # `dino_jax.load_model` without importing jax for every submodule
  if name == 'load_model':
    from dino_jax.weights import load_model  # pylint: disable=import-outside-toplevel
    return load_model
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
