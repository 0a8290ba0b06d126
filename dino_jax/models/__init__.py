"""Models: the ViT backbone, the DINO head, and the student/teacher network that joins them."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.head import DINOHead
from dino_jax.models.vit import (FFNS, PATCH_SIZES, REMAT_POLICIES, VARIANTS, ViT, ViTConfig,
                                 ViTOutput, remat_policy)


class DINO(nnx.Module):
  """Backbone + head (+ a separate iBOT patch head). Params are {'backbone', 'head'} and
  'ibot_head' when the patch head is separate."""

  def __init__(self, vit_cfg: ViTConfig, out_dim: int, *, head_hidden_dim: int = 2048,
               head_bottleneck_dim: int = 256, head_layers: int = 3,
               ibot_out_dim: int = 0, ibot_bottleneck_dim: int = 256, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.backbone = ViT(vit_cfg, dtype=dtype, rngs=rngs)
    self.head = DINOHead(vit_cfg.width, out_dim, hidden_dim=head_hidden_dim,
                         bottleneck_dim=head_bottleneck_dim, nlayers=head_layers, dtype=dtype,
                         rngs=rngs)
    self.ibot_head = (DINOHead(vit_cfg.width, ibot_out_dim, hidden_dim=head_hidden_dim,
                               bottleneck_dim=ibot_bottleneck_dim, nlayers=head_layers,
                               dtype=dtype, rngs=rngs) if ibot_out_dim else None)

  @property
  def patch_head(self) -> DINOHead:
    """The head for iBOT patch tokens: its own, or the shared DINO head."""
    return self.ibot_head if self.ibot_head is not None else self.head

  def multicrop(self, crops: list[jax.Array], key: jax.Array | None = None) -> jax.Array:
    """Head logits (f32) for crops grouped by resolution, crop-major rows.

    crops: list of arrays (n_crops_r * B, H_r, W_r, 3), one per resolution. One backbone pass
    per resolution, or one packed pass over all (ViTConfig.pack_crops), then a single head
    pass over all CLS tokens.
    """
    keys = jax.random.split(key, len(crops)) if key is not None else None
    if self.backbone.cfg.pack_crops and len(crops) > 1:
      outs = self.backbone.packed(crops, keys=keys)
    else:
      outs = [self.backbone(c, key=k) for c, k in zip(crops, keys if keys is not None else [None] * len(crops))]
    return self.head(jnp.concatenate([o.cls for o in outs], axis=0)).astype(jnp.float32)


def patch_out_dim(config) -> int:
  """Prototypes of the iBOT patch head (the DINO head's when shared)."""
  m = config.model
  return m.ibot_out_dim if m.ibot_separate_head else m.out_dim


def vit_config(config, *, teacher: bool = False) -> ViTConfig:
  """The backbone architecture `config.model` describes (teacher: no stochastic depth); the
  one config -> architecture mapping (build, exports and conversions all use it)."""
  m = config.model
  return ViTConfig.from_variant(
      m.arch, m.patch_size, img_size=config.crops.global_size,
      drop_path_rate=0.0 if teacher else m.drop_path_rate,
      drop_path_uniform=m.drop_path_uniform, layerscale=m.layerscale,
      n_registers=m.n_registers, ffn=m.ffn, mask_token=m.mask_token,
      interpolate_offset=m.interpolate_offset, interpolate_antialias=m.interpolate_antialias,
      remat=m.remat, pack_crops=m.pack_crops)


def build(config, *, teacher: bool = False, dtype=None, seed: int = 0) -> DINO:
  """Build the DINO network from `config.model` (teacher: no stochastic depth)."""
  m = config.model
  vit_cfg = vit_config(config, teacher=teacher)
  return DINO(vit_cfg, m.out_dim, head_hidden_dim=m.head_hidden_dim,
              head_bottleneck_dim=m.head_bottleneck_dim, head_layers=m.head_layers,
              ibot_out_dim=patch_out_dim(config) if m.ibot_separate_head else 0,
              ibot_bottleneck_dim=m.ibot_bottleneck_dim, dtype=jnp.dtype(dtype or config.dtype), rngs=nnx.Rngs(seed))


__all__ = ['DINO', 'DINOHead', 'FFNS', 'PATCH_SIZES', 'REMAT_POLICIES', 'VARIANTS', 'ViT',
           'ViTConfig', 'ViTOutput', 'build', 'patch_out_dim', 'remat_policy']
