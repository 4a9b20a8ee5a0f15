"""The train state's vectors in one buffer: the same training, fewer kernels.

A packed step must compute what the unpacked one does (AdamW, clip, EMA and
the skip guard are elementwise given the global norm), and the packed form must
convert both ways for any state the trainer builds (params, EMA, moments).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from persvid_jax.train import packing as packing_lib
from persvid_jax.train import state as state_lib
from persvid_jax.train import step as step_lib


def _params():
  rng = np.random.default_rng(0)
  f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
  return {"net": {"dense": {"kernel": f(4, 3), "bias": f(3)},
                  "norm": {"scale": f(3), "bias": f(3)},
                  "head": {"kernel": f(3, 2), "bias": f(2)}},
          "frozen": {"dense": {"kernel": f(2, 2), "bias": f(2)}}}


def _loss_fn(p, batch, rng):
  n = p["net"]
  h = jnp.tanh(batch["x"] @ n["dense"]["kernel"] + n["dense"]["bias"])
  h = h * n["norm"]["scale"] + n["norm"]["bias"]
  y = h @ n["head"]["kernel"] + n["head"]["bias"]
  f = p["frozen"]["dense"]
  loss = jnp.mean((y - batch["y"]) ** 2) + 1e-3 * jnp.sum(f["kernel"] @ f["bias"])
  return loss, {"loss": loss}


def _tc(clip):
  return ml_collections.ConfigDict(dict(
      trainable=("^net/",), learning_rate=0.05, warmup_steps=0, total_steps=10,
      lr_min_ratio=1.0, weight_decay=0.01, adam_b1=0.9, adam_b2=0.99, grad_clip_norm=clip))


def test_plan_packs_the_trainable_float32_vectors_and_round_trips():
  params = _params()
  params["net"]["half"] = jnp.ones((5,), jnp.bfloat16)   # not float32: stays a leaf
  mask = state_lib.trainable_mask(params, ("^net/",))
  packing = packing_lib.Packing.plan(params, mask)
  assert packing.paths == (("net", "dense", "bias"), ("net", "head", "bias"),
                           ("net", "norm", "bias"), ("net", "norm", "scale"))
  assert packing.size == 3 + 2 + 3 + 3
  packed = packing.pack(params)
  assert set(packed[packing_lib.PACKED]) == {"vectors"}
  assert packed[packing_lib.PACKED]["vectors"].shape == (11,)
  assert "bias" not in packed["net"]["dense"] and "kernel" in packed["net"]["dense"]
  assert "bias" in packed["frozen"]["dense"]                # frozen: not packed
  assert packed["net"]["half"].dtype == jnp.bfloat16
  back = packing.unpack(packed)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_plan_with_matrices_packs_weights_in_buckets(monkeypatch):
  """``matrices=True``: the trainable weights too, ``BUCKET_LEAVES`` a buffer after
  the vectors' buffer; frozen and bf16 leaves stay leaves; round trip."""
  monkeypatch.setattr(packing_lib, "BUCKET_LEAVES", 1)
  params = _params()
  params["net"]["half"] = jnp.ones((5, 2), jnp.bfloat16)
  mask = state_lib.trainable_mask(params, ("^net/",))
  packing = packing_lib.Packing.plan(params, mask, matrices=True)
  assert [name for name, _ in packing.buckets] == ["vectors", "matrices_00", "matrices_01"]
  assert [b.paths for _, b in packing.buckets[1:]] == [(("net", "dense", "kernel"),),
                                                       (("net", "head", "kernel"),)]
  assert packing.size == 11 + 12 + 6
  packed = packing.pack(params)
  assert {k: v.shape for k, v in packed[packing_lib.PACKED].items()} == {
      "vectors": (11,), "matrices_00": (12,), "matrices_01": (6,)}
  assert packed["net"] == {"dense": {}, "head": {}, "norm": {}, "half": params["net"]["half"]}
  back = packing.unpack(packed)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_nothing_to_pack_leaves_every_form_as_it_is():
  """bfloat16 parameters (or no trainable vector): the packed form is the usual one."""
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), _params())
  mask = state_lib.trainable_mask(params, ("^net/",))
  packing = packing_lib.Packing.plan(params, mask)
  assert not packing
  tx = state_lib.make_optimizer(_tc(1.0), params, packing=packing)
  state = state_lib.create_state(params, tx)
  for form in (packing.pack(params), packing.mask(mask), packing.unpack(params),
               packing.pack_state(state), packing.unpack_state(state),
               packing.pack_like(state, None)):
    assert f"'{packing_lib.PACKED}'" not in str(jax.tree.structure(form))
  assert jax.tree.structure(packing.pack_state(state)) == jax.tree.structure(state)


@pytest.mark.parametrize("clip,matrices", [(0.05, False), (100.0, False), (0.05, True)])
def test_packed_steps_equal_unpacked_steps(clip, matrices, monkeypatch):
  """Three steps of the packed train state == three of the usual one (params,
  moments, EMA, metrics), a frozen network untouched in both; vectors only, and
  the weights too (one bucket each)."""
  monkeypatch.setattr(packing_lib, "BUCKET_LEAVES", 1)
  params = _params()
  tc = _tc(clip)
  mask = state_lib.trainable_mask(params, tc.trainable)
  packing = packing_lib.Packing.plan(params, mask, matrices=matrices)
  tx = state_lib.make_optimizer(tc, params)
  tx_packed = state_lib.make_optimizer(tc, params, packing=packing)
  plain = jax.jit(step_lib.make_train_step(_loss_fn, tx, 0.9, grad_clip_norm=clip,
                                           trainable=mask, skip_nonfinite=True))
  packed = jax.jit(step_lib.make_train_step(_loss_fn, tx_packed, 0.9, grad_clip_norm=clip,
                                            trainable=packing.mask(mask), packing=packing,
                                            skip_nonfinite=True))
  a = state_lib.create_state(params, tx)
  b = packing.pack_state(a)
  # The converted state is the one the packed optimizer would have made.
  assert (jax.tree.structure(b) ==
          jax.tree.structure(state_lib.create_state(packing.pack(params), tx_packed)))
  rng = np.random.default_rng(1)
  for i in range(3):
    batch = {"x": jnp.asarray(rng.standard_normal((8, 4)), jnp.float32),
             "y": jnp.asarray(rng.standard_normal((8, 2)), jnp.float32)}
    a, ma = plain(a, batch, jax.random.key(i))
    b, mb = packed(b, batch, jax.random.key(i))
    for k in ma:
      np.testing.assert_allclose(ma[k], mb[k], rtol=1e-6, err_msg=k)
  unpacked = packing.unpack_state(b)
  assert jax.tree.structure(unpacked) == jax.tree.structure(a)
  for x, y in zip(jax.tree.leaves(unpacked), jax.tree.leaves(a)):
    np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-7)
  np.testing.assert_array_equal(unpacked.params["frozen"]["dense"]["bias"],
                                params["frozen"]["dense"]["bias"])
  assert not np.allclose(unpacked.params["net"]["norm"]["scale"], params["net"]["norm"]["scale"])


@pytest.mark.parametrize("matrices", [False, True])
def test_packed_gradient_is_the_concatenated_leaf_gradients(matrices):
  params = _params()
  packing = packing_lib.Packing.plan(params, state_lib.trainable_mask(params, ("^net/",)),
                                     matrices=matrices)
  batch = {"x": jnp.ones((2, 4)), "y": jnp.zeros((2, 2))}
  g = jax.grad(lambda p: _loss_fn(packing.unpack(p), batch, None)[0])(packing.pack(params))
  ref = jax.grad(lambda p: _loss_fn(p, batch, None)[0])(params)
  for name, bucket in packing.buckets:
    want = np.concatenate([np.ravel(packing_lib._get(ref, p)) for p in bucket.paths])
    np.testing.assert_allclose(g[packing_lib.PACKED][name], want, rtol=1e-6)
  if not matrices:
    np.testing.assert_allclose(g["net"]["dense"]["kernel"], ref["net"]["dense"]["kernel"],
                               rtol=1e-6)


def test_shardings_of_the_packed_state_replicate_the_buffer():
  """``state_shardings`` with a packing: the buffer (and its moments, its EMA)
  replicated, every other leaf as without."""
  from persvid_jax import sharding as sh
  params = _params()
  mask = state_lib.trainable_mask(params, ("^net/",))
  packing = packing_lib.Packing.plan(params, mask)
  tx = state_lib.make_optimizer(_tc(1.0), params, packing=packing)
  abstract = jax.eval_shape(lambda p: state_lib.create_state(packing.pack(p), tx), params)
  boxed = jax.tree.map(lambda x: x, params)   # no logical axes: every leaf replicated
  mesh = sh.make_mesh(1, 1)
  shards = step_lib.state_shardings(abstract, boxed, mesh, packing=packing)
  assert jax.tree.structure(shards) == jax.tree.structure(abstract)
  assert shards.params[packing_lib.PACKED]["vectors"].spec == jax.sharding.PartitionSpec()


def test_conv_kernels_are_stored_output_channels_first():
  """A packed conv kernel ``[*window, I, O]`` lies in its buffer as ``[O, *window, I]``
  (cuDNN's filter order); it unpacks to itself, and its gradient lands in that order."""
  rng = np.random.default_rng(1)
  conv = jnp.asarray(rng.standard_normal((3, 1, 2, 5)), jnp.float32)      # [H, W, I, O]
  conv3 = jnp.asarray(rng.standard_normal((1, 3, 3, 2, 4)), jnp.float32)  # [T, H, W, I, O]
  params = {"net": {"c": {"kernel": conv}, "c3": {"kernel": conv3},
                    "d": {"kernel": jnp.ones((2, 3), jnp.float32)}}}
  packing = packing_lib.Packing.plan(params, jax.tree.map(lambda _: True, params),
                                     matrices=True)
  (name, bucket), = packing.buckets
  assert [bucket.perm(i) for i in range(3)] == [(3, 0, 1, 2), (4, 0, 1, 2, 3), (0, 1)]
  flat = packing.pack(params)[packing_lib.PACKED][name]
  o = dict(zip(bucket.paths, bucket.offsets))
  np.testing.assert_array_equal(flat[o[("net", "c", "kernel")]:][:30].reshape(5, 3, 1, 2),
                                np.transpose(conv, (3, 0, 1, 2)))
  back = packing.unpack(packing.pack(params))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  weights = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32),
                         params)
  loss = lambda p: sum(jnp.sum(jnp.sin(a) * w) for a, w in
                       zip(jax.tree.leaves(p), jax.tree.leaves(weights)))
  rest = packing.pack(params)
  g = jax.grad(lambda f: loss(packing.unpack({**rest, packing_lib.PACKED: {name: f}})))(flat)
  ref = jax.grad(loss)(params)
  want = packing.pack(ref)[packing_lib.PACKED][name]
  np.testing.assert_allclose(g, want, rtol=1e-6)
