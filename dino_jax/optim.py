"""The DINO optimizer as one optax chain.

    gradient clipping: each tensor to norm <= clip on its own (v1), or each module's global
    norm (v2)
 -> Adam moments (the head's last layer keeps its own moments, untouched while frozen)
 -> decoupled weight decay on the scheduled value, except biases and 1-D tensors
 -> scale by the scheduled learning rate
 -> zero the last layer while it is frozen (no update AND no decay), and g always when
    `norm_last_layer` (it stays exactly 1)
 -> layer-wise lr decay and the patch-embedding lr factor (v2), scaling lr and decay alike as
    PyTorch param groups with their own lr do

This is PyTorch AdamW as the official code drives it: a frozen parameter there gets no grad,
so AdamW skips it entirely and its step counter starts when it unfreezes.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dino_jax.models.vit import VARIANTS
from dino_jax.sharding import path_name
from dino_jax.schedules import Schedules


def param_names(params) -> Any:
  """A tree like `params` whose leaves are their '/'-joined paths."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path_name(path), params)


def decay_mask(params) -> Any:
  """True where weight decay applies: not biases, not 1-D tensors (official param groups)."""
  return jax.tree.map(lambda name, p: not (name.endswith('bias') or p.ndim <= 1),
                      param_names(params), params)


def param_labels(params, norm_last_layer: bool) -> Any:
  """'frozen' for g under norm_last_layer, 'last_layer' for the prototypes, else 'rest'."""
  def label(name):
    if 'last_layer' not in name:
      return 'rest'
    return 'frozen' if norm_last_layer and name.endswith('weight_g') else 'last_layer'
  return jax.tree.map(label, param_names(params))


def lr_multipliers(params, depth: int, layer_decay: float, patch_embed_mult: float) -> Any:
  """Per-parameter lr factors (DINOv2's param groups): decay ** (depth + 1 - layer id), where
  the embeddings (patch_embed, pos_embed, cls/register/mask tokens) are layer 0, block i is
  layer i + 1 and everything after the blocks (final norm, heads) is depth + 1 (factor 1);
  the patch embedding gets `patch_embed_mult` on top."""
  embeddings = ('patch_embed', 'pos_embed', 'cls_token', 'register_tokens', 'mask_token')

  def factor(name):
    parts = name.split('/')
    if parts[0] != 'backbone':
      layer = depth + 1
    elif parts[1] in embeddings:
      layer = 0
    elif parts[1] == 'blocks':
      layer = int(parts[2]) + 1
    else:
      layer = depth + 1
    mult = layer_decay ** (depth + 1 - layer)
    return mult * (patch_embed_mult if parts[:2] == ['backbone', 'patch_embed'] else 1.0)
  return jax.tree.map(factor, param_names(params))


def scale_per_param(factors) -> optax.GradientTransformation:
  """Multiply each update by its (static) factor."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u * f if f != 1.0 else u, updates, factors), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_global_norm_per_module(max_norm: float) -> optax.GradientTransformation:
  """Clip each top-level module's gradients (backbone, head, ibot_head) to global norm
  max_norm, as DINOv2 does (factor max_norm / (norm + 1e-6) when below 1)."""
  def update(updates, state, params=None):
    del params
    def clip(tree):
      c = max_norm / (optax.global_norm(tree) + 1e-6)
      return jax.tree.map(lambda g: jnp.where(c < 1.0, g * c, g).astype(g.dtype), tree)
    return {k: clip(v) for k, v in updates.items()}, state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def clip_by_norm_per_param(max_norm: float) -> optax.GradientTransformation:
  """Scale each tensor g by max_norm / (||g|| + 1e-6) when that is below 1."""
  def update(updates, state, params=None):
    del params
    def clip(g):
      c = max_norm / (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) + 1e-6)
      return jnp.where(c < 1.0, g * c, g).astype(g.dtype)
    return jax.tree.map(clip, updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class FreezeState(NamedTuple):
  count: jax.Array
  inner: Any


def freeze_while(inner: optax.GradientTransformation,
                 frozen: Callable[[jax.Array], jax.Array]) -> optax.GradientTransformation:
  """Run `inner` except at steps where frozen(step): then emit zeros and keep inner's state."""
  def init(params):
    return FreezeState(jnp.zeros([], jnp.int32), inner.init(params))

  def update(updates, state, params=None):
    new_updates, new_inner = inner.update(updates, state.inner, params)
    f = frozen(state.count)
    new_updates = jax.tree.map(lambda u: jnp.where(f, jnp.zeros_like(u), u), new_updates)
    new_inner = jax.tree.map(lambda old, new: jnp.where(f, old, new), state.inner, new_inner)
    return new_updates, FreezeState(optax.safe_increment(state.count), new_inner)

  return optax.GradientTransformation(init, update)


def zero_labelled(labels: Any, frozen: Callable[[jax.Array], jax.Array]):
  """Zero 'frozen' updates always and 'last_layer' updates while frozen(step)."""
  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    f = frozen(state.count)
    def apply(label, u):
      zero = (label == 'frozen') or (f if label == 'last_layer' else False)
      return jnp.where(zero, jnp.zeros_like(u), u)
    return (jax.tree.map(apply, labels, updates),
            optax.ScaleByScheduleState(optax.safe_increment(state.count)))

  return optax.GradientTransformation(init, update)


CLIPS = {'per_param': clip_by_norm_per_param, 'per_module': clip_by_global_norm_per_module}


def make(config, schedules: Schedules, params) -> optax.GradientTransformation:
  """The optimizer for `params` (the student's pure-dict params)."""
  o = config.optim
  labels = param_labels(params, config.model.norm_last_layer)
  adam = lambda: optax.scale_by_adam(b1=o.b1, b2=o.b2, eps=o.eps)
  parts = []
  if o.clip_grad > 0:
    parts.append(CLIPS[o.clip_mode](o.clip_grad))
  parts += [
      optax.multi_transform({'rest': adam(),
                             'last_layer': freeze_while(adam(), schedules.last_layer_frozen),
                             'frozen': optax.set_to_zero()}, labels),
      optax.add_decayed_weights(schedules.weight_decay, mask=decay_mask(params)),
      optax.scale_by_learning_rate(schedules.lr),
      zero_labelled(labels, schedules.last_layer_frozen),
  ]
  if o.layer_decay != 1.0 or o.patch_embed_lr_mult != 1.0:
    depth = VARIANTS[config.model.arch][1]
    parts.append(scale_per_param(lr_multipliers(params, depth, o.layer_decay,
                                                o.patch_embed_lr_mult)))
  return optax.chain(*parts)
