"""Models: the ViT backbone (vit.py), the DINO head (head.py) and the network that joins them,
built from a config (dino.py). This file only re-exports their public names."""
from dino_jax.models.dino import DINO, build, patch_out_dim, vit_config
from dino_jax.models.head import DINOHead
from dino_jax.models.vit import (FFNS, PATCH_SIZES, REMAT_POLICIES, VARIANTS, ViT, ViTConfig,
                                 ViTOutput, remat_policy)

__all__ = ['DINO', 'DINOHead', 'FFNS', 'PATCH_SIZES', 'REMAT_POLICIES', 'VARIANTS', 'ViT',
           'ViTConfig', 'ViTOutput', 'build', 'patch_out_dim', 'remat_policy', 'vit_config']
