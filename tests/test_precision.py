"""Mixed precision and memory options: bf16 compute on f32 params, the fused attention call,
and block rematerialisation."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dino_jax import data, models, sharding, train
from dino_jax.models.attention import Attention
from dino_jax.models.vit import ViT, ViTConfig
from conftest import tiny_config


def test_fused_attention_matches_the_exact_map_path():
  attn = Attention(48, 3, dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 17, 48))
  fused, none = attn(x)
  exact, maps = attn(x, return_attention=True)
  assert none is None and maps.shape == (2, 3, 17, 17) and maps.dtype == jnp.float32
  np.testing.assert_allclose(fused, exact, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-6)


def test_remat_gives_the_same_gradients():
  cfg = dict(width=48, depth=2, heads=3, patch_size=4, img_size=16, drop_path_rate=0.1)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  key = jax.random.PRNGKey(2)
  grads = []
  for remat in (False, True):
    gdef, params = nnx.split(ViT(ViTConfig(**cfg, remat=remat), rngs=nnx.Rngs(0)))
    loss = lambda p: jnp.sum(nnx.merge(gdef, p)(images, key=key).cls ** 2)
    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # the backward pass really recomputes: the remat graph holds a checkpoint
  gdef, params = nnx.split(ViT(ViTConfig(**cfg, remat=True), rngs=nnx.Rngs(0)))
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: nnx.merge(gdef, p)(images).cls.sum()))(params)
  assert 'remat' in str(jaxpr) or 'checkpoint' in str(jaxpr)


def test_bfloat16_step_keeps_f32_state_and_tracks_the_f32_loss():
  losses = {}
  for dtype in ('float32', 'bfloat16'):
    config = tiny_config(dtype=dtype)
    run = train.build(config, sharding.make_mesh(1, 1, jax.devices()[:1]))
    state = train.init_state(run)
    batch = data.train_dataset(run.train_source, canvas_size=config.data.canvas_size,
                               global_batch=config.batch_size, seed=0)[0]
    new_state, metrics = run.step_fn(state, sharding.to_global(batch, run.mesh))
    dtypes = {x.dtype for x in jax.tree.leaves((new_state.params, new_state.teacher_params,
                                                new_state.opt_state, new_state.center))
              if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}, dtype
    assert metrics['loss'].dtype == jnp.float32
    losses[dtype] = float(metrics['loss'])
  assert np.isfinite(losses['bfloat16'])
  np.testing.assert_allclose(losses['bfloat16'], losses['float32'], rtol=2e-2)


def test_bfloat16_model_computes_in_bfloat16_on_f32_params():
  config = tiny_config(dtype='bfloat16')
  model = models.build(config)
  assert {p.dtype for p in jax.tree.leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.float32)}
  out = model.backbone(jnp.zeros((2, 16, 16, 3)))
  assert out.cls.dtype == jnp.bfloat16
  # the train step's student pass (packed global + local crops) and head, in bf16
  g_out, cls = model.backbone_crops(jnp.zeros((2, 16, 16, 3)), jnp.zeros((4, 8, 8, 3)),
                                    jax.random.PRNGKey(0))
  assert g_out.cls.dtype == cls.dtype == jnp.bfloat16 and cls.shape[0] == 6
  assert model.head(cls).dtype == jnp.bfloat16  # the objective casts the logits to f32
