"""The input pipeline: ``make_dataset(config, split, ...)`` -> numpy batches.

Three sources, chosen by ``config.data.source``:

* ``'tfds'``: a built TFDS dataset (``config.data.name``, default
  ``persvid_synthetic/tiny``) through tf.data: per-host split
  (``tfds.split_for_jax_process``), seeded file shuffle + shuffle buffer,
  repeat, batch (``drop_remainder``), prefetch. TensorFlow never sees the
  GPUs (``tf.config.set_visible_devices([], 'GPU')``), so it cannot take
  accelerator memory from JAX. A missing ``persvid_synthetic`` is built on
  the spot when ``config.data.prepare`` (build it beforehand on multi-host).
* ``'renderer'``: the numpy renderer on the fly — no TensorFlow, no build;
  the same examples as the TFDS build of the same config.
* ``'folder'``: a user corpus (``config.data.folder``, see ``folders.py``),
  also numpy only; ``split`` only selects the shuffle/repeat defaults.

A batch is a dict of numpy arrays (``B`` = the per-process ``batch_size``)::

    video           float32 [B, T, H, W, 3] in [-1, 1]
    mask            float32 [B, T, H, W, 1] in [0, 1]   subject coverage
    frame_mask      float32 [B, T]                      1 = real frame
    reference       float32 [B, R, R, 3] in [-1, 1];  reference_mask [B, R, R, 1]
    has_reference   float32 [B]                         0 for folder data
    subject_id      int64 [B] (-1 for folder data);  index int64 [B]
    caption, placeholder_caption, oracle_caption (+ still_*)   object [B] of str
    <key>_tokens    int32 [B, L] for each key in tokenize_keys, when tokenize is given
  plus the synthetic attributes (shape, primary_rgb, direction, track, …)
  from synthetic sources. ``arrays_only(batch)`` drops the strings.

**Tokens.** ``tokenize`` (e.g. ``PromptTokenizer.from_config(config).encode``,
``B`` strings -> ``[B, L]`` int32) runs on the numpy side after batching:
one vectorised call per batch in the host loop, instead of a
``tf.py_function`` inside tf.data (which holds the GIL, cannot be
serialised, and would tie the tokenizer to TensorFlow).

**Stills.** With ``config.data.image_fraction = p``, each example becomes,
with probability ``p``, a 1-frame video of one of its frames
(``frame_mask = [1, 0, …]``; the other frames are 0 in storage, so -1 in
``video``) with the ``still_*``
captions and ``direction = -1``: images mixed into video training.

**Determinism and resume.** The order is a function of (seed, process
index/count, batch size): same arguments, same batches. To resume at step
``s``, pass ``start_batch=s``: the numpy sources jump there in O(1) (element
``k`` of process ``p`` is global position ``k * P + p``; position ``g`` is
example ``perm_{g // N}[g % N]`` with a seeded permutation per epoch); the
tf.data source skips ``s`` batches after batching (re-reads them, cheap at
our sizes; the shuffle state cannot be jumped).
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from persvid_jax.data import DataError
from persvid_jax.data import synthetic

Batch = dict[str, np.ndarray]
Tokenize = Callable[[Sequence[str]], np.ndarray]

# uint8 in storage -> float32 for the model.
_SIGNED_KEYS = ("video", "reference")                 # [0, 255] -> [-1, 1]
_UNIT_KEYS = ("mask", "reference_mask")               # [0, 255] -> [0, 1]
_FLOAT_KEYS = ("frame_mask", "has_reference")         # {0, 1}   -> float32
_STILL_CAPTIONS = ("caption", "placeholder_caption", "oracle_caption")
SOURCES = ("tfds", "renderer", "folder")


def arrays_only(batch: Batch) -> Batch:
  """The batch without its string arrays (what goes to the device)."""
  return {k: v for k, v in batch.items() if v.dtype != object}


def _host_seed(seed: int, process_index: int) -> int:
  """One 31-bit seed per (seed, process): hosts shuffle their shards differently."""
  return int(np.random.SeedSequence([seed, process_index]).generate_state(1)[0] >> 1)


def _defaults(config, split, process_index, process_count, seed, shuffle, repeat):
  if process_index is None or process_count is None:
    import jax   # lazy: the numpy sources need no accelerator runtime
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  training = split.split("[")[0] == config.data.get("train_split", "train")
  return (process_index, process_count,
          config.seed if seed is None else seed,
          training if shuffle is None else shuffle,
          training if repeat is None else repeat)


def make_dataset(config, split: str, *, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 seed: int | None = None, shuffle: bool | None = None,
                 repeat: bool | None = None, start_batch: int = 0,
                 drop_remainder: bool = True, tokenize: Tokenize | None = None,
                 tokenize_keys: Sequence[str] = ("caption", "placeholder_caption"),
                 ) -> Iterator[Batch]:
  """Batches of ``split`` for this process (see the module docstring).

  Args:
    config: the full config (``config.data``, ``config.seed``).
    split: ``'train'`` / ``'test'`` (TFDS slicing such as ``'train[:10%]'``
      works for the tfds source).
    batch_size: per-process batch; the global batch is ``batch_size *
      process_count``.
    process_index, process_count: default ``jax.process_index() / count()``.
    seed: default ``config.seed``.
    shuffle, repeat: default True for the train split, False otherwise.
    start_batch: resume: the first batch yielded is batch ``start_batch``.
    drop_remainder: drop a last partial batch (only matters without repeat).
    tokenize: ``B`` strings -> ``[B, L]`` int32; adds ``<key>_tokens``.
    tokenize_keys: which caption keys to tokenize.

  Returns:
    An iterator of numpy batch dicts.
  """
  data = config.data
  if data.source not in SOURCES:
    raise DataError(f"config.data.source is {data.source!r}; use one of {SOURCES}")
  process_index, process_count, seed, shuffle, repeat = _defaults(
      config, split, process_index, process_count, seed, shuffle, repeat)
  if not 0 <= data.image_fraction <= 1:
    raise DataError(f"config.data.image_fraction is {data.image_fraction}; use [0, 1]")
  kw = dict(batch_size=batch_size, process_index=process_index,
            process_count=process_count, seed=seed, shuffle=shuffle, repeat=repeat,
            start_batch=start_batch, drop_remainder=drop_remainder,
            image_fraction=data.image_fraction)
  if data.source == "tfds":
    batches = _tfds_batches(config, split, **kw)
  else:
    source = _renderer_source(config, split) if data.source == "renderer" else _folder_source(config)
    batches = _indexed_batches(
        source, workers=data.get("workers", 4), prefetch=data.get("prefetch", 2),
        processes=data.get("processes", 0) if data.source == "renderer" else 0, **kw)
  return _finish(batches, tokenize, tokenize_keys)


def _finish(batches: Iterator[Batch], tokenize, keys) -> Iterator[Batch]:
  for batch in batches:
    for key, value in batch.items():
      if value.dtype == object:   # tf.data gives bytes
        batch[key] = np.array([v.decode("utf-8") if isinstance(v, bytes) else v
                               for v in value], dtype=object)
    if tokenize is not None:
      for key in keys:
        batch[f"{key}_tokens"] = np.asarray(tokenize(list(batch[key])), np.int32)
    yield batch


# ----------------------------------------------------------------------------
# numpy sources: index -> example, deterministic order, O(1) resume
# ----------------------------------------------------------------------------

class _RendererSource:
  """``get(i)`` = ``synthetic.render_example`` of one split."""

  def __init__(self, render: synthetic.SyntheticConfig, split: str):
    self.render, self.split = render, split

  def __len__(self) -> int:
    return self.render.num_examples(self.split)

  def get(self, i: int) -> dict[str, Any]:
    return synthetic.render_example(self.render, self.split, i)


def synthetic_config(config) -> synthetic.SyntheticConfig:
  """The renderer config of ``config.data`` (its name, with the data shape overrides)."""
  data = config.data
  return synthetic.config_from_name(
      data.name, frames=data.get("frames"), height=data.get("height"),
      width=data.get("width"), reference_size=data.get("reference_size"))


def _renderer_source(config, split: str) -> _RendererSource:
  if split not in synthetic.SPLITS:
    raise DataError(f"the renderer source has splits {synthetic.SPLITS}, not {split!r}")
  return _RendererSource(synthetic_config(config), split)


def _folder_source(config):
  from persvid_jax.data import folders
  data = config.data
  if not data.get("folder"):
    raise DataError("config.data.source is 'folder' but config.data.folder is unset; "
                    "pass --config.data.folder=/path/to/corpus")
  if not (data.get("frames") and data.get("height") and data.get("width")):
    raise DataError("a folder source needs config.data.frames/height/width (the shape "
                    "every video is resized and padded to)")
  return folders.CaptionedFolder(
      data.folder, data.get("captions"), frames=data.frames, height=data.height,
      width=data.width, reference_size=data.get("reference_size"),
      frame_stride=data.get("frame_stride", 1), kind=data.get("folder_kind", "any"))


def to_still(example: dict[str, Any], frame: int) -> dict[str, Any]:
  """Example -> a 1-frame video of its ``frame``-th frame with the still captions."""
  out = dict(example)
  for key in ("video", "mask", "track"):
    if key in example:
      x = np.zeros_like(example[key])
      x[0] = example[key][frame]
      out[key] = x
  out["frame_mask"] = np.zeros_like(example["frame_mask"])
  out["frame_mask"][0] = 1
  for key in _STILL_CAPTIONS:
    out[key] = example[f"still_{key}"]
  if "direction" in example:
    out["direction"] = np.int32(-1)       # a still has no motion
  return out


def _maybe_still(example, position: int, seed: int, fraction: float):
  if fraction <= 0:
    return example
  rng = np.random.default_rng([seed, 0x5711, position])
  if rng.uniform() >= fraction:
    return example
  valid = np.flatnonzero(example["frame_mask"])
  return to_still(example, int(valid[rng.integers(len(valid))]))


def _stack(examples: list[dict[str, Any]]) -> Batch:
  batch = {}
  for key in examples[0]:
    values = [e[key] for e in examples]
    if isinstance(values[0], str):
      batch[key] = np.array(values, dtype=object)
    else:
      batch[key] = np.stack([np.asarray(v) for v in values])
  # Divisions (not multiplications by 1/x): bit-identical to _tf_to_float.
  for key in _SIGNED_KEYS:
    batch[key] = batch[key].astype(np.float32) / np.float32(127.5) - np.float32(1)
  for key in _UNIT_KEYS:
    batch[key] = batch[key].astype(np.float32) / np.float32(255)
  for key in _FLOAT_KEYS:
    batch[key] = batch[key].astype(np.float32)
  return batch


def _indexed_batches(source, *, batch_size, process_index, process_count, seed, shuffle,
                     repeat, start_batch, drop_remainder, image_fraction, workers=4,
                     prefetch=2, processes=0) -> Iterator[Batch]:
  """Batches over an indexable source (``len`` + ``get(i) -> example | None``).

  Element ``k`` of this process is global position ``g = k * P + p``; ``g``
  maps to example ``perm_e[g % N]`` of epoch ``e = g // N`` (identity order
  without shuffle). An unreadable example (``get`` -> None) is replaced by
  the next readable one of the same epoch, so the order stays a function of
  ``g`` alone and resuming needs no history.

  ``workers`` threads load examples (PIL and ffmpeg release the GIL); with
  ``processes > 0`` a pool of that many spawned processes does instead (the
  renderer is numpy-bound and holds the GIL much of the time; the source
  must pickle).
  """
  n = len(source)
  P, p = process_count, process_index
  if repeat:
    stop = None
  else:   # this process's share of one epoch: positions p, p + P, ... < n
    elements = max(0, (n - p + P - 1) // P)
    stop = elements // batch_size if drop_remainder else -(-elements // batch_size)

  def positions(b: int) -> range:
    first, last = b * batch_size, (b + 1) * batch_size
    if not repeat:
      last = min(last, elements)
    return range(first * P + p, last * P + p, P)

  if processes > 0:
    import multiprocessing
    # spawn, not fork: the parent holds JAX's and the pool's threads.
    pool = concurrent.futures.ProcessPoolExecutor(
        processes, mp_context=multiprocessing.get_context("spawn"),
        initializer=_ignore_stop_signals)
  else:
    pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))

  def submit(b: int) -> list:
    return [pool.submit(_example_at, source, g, seed, shuffle, image_fraction)
            for g in positions(b)]

  batch_ids = itertools.count(start_batch) if stop is None else iter(range(start_batch, stop))
  pending: collections.deque = collections.deque()
  try:
    # Keep `prefetch` batches in flight, so loading overlaps the consumer.
    for b in itertools.islice(batch_ids, max(1, prefetch)):
      pending.append(submit(b))
    while pending:
      futures = pending.popleft()
      b = next(batch_ids, None)
      if b is not None:
        pending.append(submit(b))
      yield _stack([f.result() for f in futures])
  finally:
    pool.shutdown(wait=False, cancel_futures=True)


def _ignore_stop_signals() -> None:
  """Input worker processes leave SIGTERM / SIGINT to the trainer.

  A scheduler (or ``timeout``, or Ctrl-C) signals the whole process group;
  the trainer then finishes its step and checkpoints, and needs its input
  workers alive until it has. They exit when the pool is shut down or the
  trainer's pipes close.

  Ignoring the signals means a trainer that dies without shutting the pool
  down (``kill -9``, the OOM killer) would leave them orphaned: a worker
  idling in its call queue never notices. So a daemon thread watches the
  parent and ends the worker (``os._exit``: no cleanup owed to a dead
  parent) within about a second (``poll_s``) of it vanishing -- also when
  it vanished while this worker was still starting (the trainer's pid comes
  from multiprocessing, not from ``getppid`` at this point).
  """
  import multiprocessing
  import os
  import signal
  import threading
  import time
  poll_s = 1.0
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  parent = multiprocessing.parent_process()     # None only outside multiprocessing
  parent_pid = parent.pid if parent is not None else os.getppid()

  def watch():
    # Gone: re-parented (to init or a subreaper), or its sentinel pipe closed.
    while os.getppid() == parent_pid and (parent is None or parent.is_alive()):
      time.sleep(poll_s)
    os._exit(0)

  threading.Thread(target=watch, name="orphan-watchdog", daemon=True).start()


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  """``[N]`` example order of ``epoch``: a seeded permutation (or identity).

  A pure function of its arguments, so every worker thread or process
  computes the same order (and caches the epochs it straddles).
  """
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, 0x5EED, epoch]).permutation(n)


def _example_at(source, g: int, seed: int, shuffle: bool, image_fraction: float):
  """The example at global position ``g`` (see ``_indexed_batches``)."""
  n = len(source)
  epoch, pos = divmod(g, n)
  order = _epoch_order(n, seed, epoch, shuffle)
  for step in range(n):
    example = source.get(int(order[(pos + step) % n]))
    if example is not None:
      return _maybe_still(example, g, seed, image_fraction)
  raise DataError(f"no readable example in the source ({n} entries, all unreadable)")


# ----------------------------------------------------------------------------
# TFDS source (tf.data)
# ----------------------------------------------------------------------------

def _import_tf():
  """TensorFlow, with the GPUs hidden from it (JAX owns the accelerators)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:   # TF already initialised its devices; nothing to undo
    pass
  return tf


def tfds_builder(config):
  """The TFDS builder of ``config.data.name``; builds ``persvid_synthetic`` if
  missing and ``config.data.prepare``; checks the shapes against ``config.data``."""
  import tensorflow_datasets as tfds
  from persvid_jax.data import synthetic_tfds   # registers persvid_synthetic
  data = config.data
  try:
    builder = tfds.builder(data.name, data_dir=data.get("data_dir"))
  except Exception as e:  # noqa: BLE001 — tfds raises several types for an unknown name
    raise DataError(f"cannot open TFDS dataset {data.name!r} ({type(e).__name__}: {e}); "
                    "check config.data.name") from e
  if not builder.is_prepared():
    if isinstance(builder, synthetic_tfds.PersvidSynthetic) and data.get("prepare", True):
      builder = synthetic_tfds.prepare(builder.builder_config.name, data.get("data_dir"))
    else:
      raise DataError(
          f"TFDS dataset {data.name!r} is not built in {builder.data_dir_root!s}; build it "
          "first (for persvid_synthetic: python -m persvid_jax.data --name NAME "
          "--data_dir DIR) or set config.data.data_dir")
  video = builder.info.features["video"].shape
  want = tuple(data.get(k) for k in ("frames", "height", "width"))
  if any(w is not None and w != v for w, v in zip(want, video[:3])):
    raise DataError(f"{data.name} has videos of shape {video} but config.data asks for "
                    f"frames/height/width {want}; choose a matching dataset or set "
                    "config.data.frames/height/width to None")
  return builder


def _tfds_batches(config, split, *, batch_size, process_index, process_count, seed, shuffle,
                  repeat, start_batch, drop_remainder, image_fraction) -> Iterator[Batch]:
  # Not a generator: a missing dataset or a shape mismatch raises here, at
  # make_dataset time, not at the first next().
  tf = _import_tf()
  import tensorflow_datasets as tfds
  data = config.data
  builder = tfds_builder(config)
  host_seed = _host_seed(seed, process_index)
  # Even per-process slices of the split (tfds.even_splits by absolute index).
  subsplit = tfds.split_for_jax_process(split, process_index=process_index,
                                        process_count=process_count)
  # persvid_synthetic is stored in index order; unshuffled reads keep it
  # (one file at a time), shuffled ones waive TFDS's ordering guard on purpose.
  order = {} if shuffle else {"interleave_cycle_length": 1}
  read_config = tfds.ReadConfig(shuffle_seed=host_seed, skip_prefetch=True,
                                enable_ordering_guard=not shuffle, **order)
  ds = builder.as_dataset(split=subsplit, shuffle_files=shuffle, read_config=read_config)
  if data.get("cache", False):
    ds = ds.cache()
  if shuffle:
    # Before repeat: clean epochs (every example once per epoch), as in the
    # numpy sources; reshuffled each epoch, deterministically from the seed.
    ds = ds.shuffle(data.get("shuffle_buffer", 1024), seed=host_seed,
                    reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  if image_fraction > 0:
    still = _tf_still_fn(tf, host_seed, image_fraction)
    ds = ds.enumerate().map(still, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.map(_tf_to_float, num_parallel_calls=tf.data.AUTOTUNE)
  if start_batch:
    ds = ds.skip(start_batch)
  ds = ds.prefetch(data.get("prefetch", 2))
  options = tf.data.Options()
  options.deterministic = True   # parallel maps keep order: exact resume needs it
  ds = ds.with_options(options)
  return ds.as_numpy_iterator()


def _tf_to_float(batch):
  import tensorflow as tf
  batch = dict(batch)
  for key in _SIGNED_KEYS:
    batch[key] = tf.cast(batch[key], tf.float32) / 127.5 - 1.0
  for key in _UNIT_KEYS:
    batch[key] = tf.cast(batch[key], tf.float32) / 255.0
  for key in _FLOAT_KEYS:
    batch[key] = tf.cast(batch[key], tf.float32)
  return batch


def _tf_still_fn(tf, host_seed: int, fraction: float):
  """``(counter, example) -> example``, a still with probability ``fraction``
  (the tf.data twin of ``_maybe_still``, keyed on the host's element counter)."""

  def still(counter, example):
    key = tf.stack([tf.constant(host_seed, tf.int64), counter])
    u = tf.random.stateless_uniform([], seed=key)
    valid = tf.reshape(tf.where(example["frame_mask"] > 0), [-1])
    pick = tf.random.stateless_uniform([], seed=key + tf.constant([1, 0], tf.int64),
                                       maxval=tf.size(valid, tf.int32), dtype=tf.int32)
    frame = valid[pick]
    is_still = u < fraction
    out = dict(example)
    for k in ("video", "mask", "track"):
      if k in example:
        x = example[k]
        first = tf.concat([x[frame][None], tf.zeros_like(x[1:])], axis=0)
        out[k] = tf.where(is_still, first, x)
    first_only = tf.cast(tf.range(tf.shape(example["frame_mask"])[0]) == 0,
                         example["frame_mask"].dtype)
    out["frame_mask"] = tf.where(is_still, first_only, example["frame_mask"])
    for k in _STILL_CAPTIONS:
      out[k] = tf.where(is_still, example[f"still_{k}"], example[k])
    if "direction" in example:
      out["direction"] = tf.where(is_still, tf.constant(-1, example["direction"].dtype),
                                  example["direction"])
    return out

  return still
