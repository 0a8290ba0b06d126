"""dino_jax: DINO / DINOv2 self-supervised ViT training in JAX and Flax."""
__version__ = '0.1.0'
