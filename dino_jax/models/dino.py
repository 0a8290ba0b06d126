"""The DINO network: a ViT backbone and its DINO head (+ a separate iBOT patch head), built
from a config.

`vit_config` is the one config -> architecture mapping (build, exports and conversions all use
it); `build` makes the student or the teacher network from `config.model`.
`DINO.backbone_crops` is the student's backbone pass over every crop as the train step runs it
(one packed token matrix, or one pass per crop size), which the bench breakdown times too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dino_jax.models.head import DINOHead
from dino_jax.models.vit import ViT, ViTConfig, ViTOutput


def _batch_shards(sharding, n_rows: int) -> int:
  """Shards of a batch axis of n_rows under `sharding` (1 without one)."""
  return 1 if sharding is None else n_rows // sharding.shard_shape((n_rows,))[0]


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

  def backbone_crops(self, global_crops: jax.Array, local_crops: jax.Array | None,
                     key: jax.Array, *, masks: jax.Array | None = None,
                     sharding=None) -> tuple[ViTOutput, jax.Array]:
    """The student's backbone over every crop: (the global crops' ViTOutput, the CLS tokens of
    all crops, crop-major: global rows then local rows).

    global_crops (n_global * B, H, W, 3), local_crops (n_local * B, h, w, 3) or None; key:
    drop-path and RoPE-augmentation randomness (one key per crop size is split from it);
    masks: the global crops' (n_global * B, N) iBOT masks or None. The local crops pass as
    local (their own CLS norm where the backbone unties it). With ViTConfig.pack_crops all
    crops run as one packed token matrix, packed per batch shard of `sharding` (the crops'
    batch sharding; one shard when the row counts do not divide), else one backbone pass per
    crop size.
    """
    k_g, k_l = jax.random.split(key)
    if local_crops is None:
      g_out = self.backbone(global_crops, key=k_g, masks=masks)
      return g_out, g_out.cls
    if self.backbone.cfg.pack_crops:
      rows = (global_crops.shape[0], local_crops.shape[0])
      shards = _batch_shards(sharding, sum(rows))
      shards = shards if all(r % shards == 0 for r in rows) else 1
      g_out, l_out = self.backbone.packed([global_crops, local_crops], keys=[k_g, k_l],
                                          masks=[masks, None], shards=shards,
                                          local=[False, True])
    else:
      g_out = self.backbone(global_crops, key=k_g, masks=masks)
      l_out = self.backbone(local_crops, key=k_l, local=True)
    return g_out, jnp.concatenate([g_out.cls, l_out.cls], axis=0)


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
      remat=m.remat, pack_crops=m.pack_crops, stem=m.stem,
      pos_embed=m.pos_embed, rope_base=m.rope_base, rope_min_period=m.rope_min_period,
      rope_max_period=m.rope_max_period, rope_normalize=m.rope_normalize,
      rope_shift=m.rope_shift, rope_jitter=m.rope_jitter, rope_rescale=m.rope_rescale,
      untie_cls_and_patch_norms=m.untie_cls_and_patch_norms,
      untie_global_and_local_cls_norm=m.untie_global_and_local_cls_norm,
      mask_k_bias=m.mask_k_bias, qkv_bias=m.qkv_bias, ln_eps=m.ln_eps,
      register_init_std=m.register_init_std)


def build(config, *, teacher: bool = False, dtype=None, seed: int = 0) -> DINO:
  """Build the DINO network from `config.model` (teacher: no stochastic depth)."""
  m = config.model
  vit_cfg = vit_config(config, teacher=teacher)
  return DINO(vit_cfg, m.out_dim, head_hidden_dim=m.head_hidden_dim,
              head_bottleneck_dim=m.head_bottleneck_dim, head_layers=m.head_layers,
              ibot_out_dim=patch_out_dim(config) if m.ibot_separate_head else 0,
              ibot_bottleneck_dim=m.ibot_bottleneck_dim,
              dtype=jnp.dtype(dtype or config.dtype), rngs=nnx.Rngs(seed))
