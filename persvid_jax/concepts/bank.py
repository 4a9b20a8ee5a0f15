"""The personalization database as a pytree, and the concept swap.

``ConceptBank`` holds, for each of ``C`` fixed slots, the concept's reference
feature (``K`` pseudo-word tokens in text-embedding space: the concept swap) and its
detail feature (``N`` detail tokens), plus a ``valid`` flag. The
capacity is fixed and the arrays are plain leaves, so adding, replacing or
removing a concept changes *values*, never shapes: a jitted generator that
takes the bank as an argument compiles once for every bank content.

``swap_embeddings`` is the replacement of the concept's part of the text
encoding by its reference tokens, as a dense gather + masked select over the
token positions (no Python loop over tokens, no data-dependent shapes).
``encode_prompt`` runs it at the text encoder's input (token embeddings,
textual-inversion style) or output (per-token states, the patent's literal
wording), per ``config.concepts.swap_at``.

Placeholder convention (``concepts/tokens.py``): ``<ci>`` has id
``placeholder_start + i``, and ``PromptTokenizer.encode`` writes ``K``
consecutive copies of it; the ``k``-th copy of a run receives
``ref_tokens[i, k % K]``.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

SWAP_AT = ("input", "output")


@flax.struct.dataclass
class ConceptBank:
  """``C`` concept slots; every update returns a new bank (pure, jit-safe).

  Attributes:
    ref_tokens: ``[C, K, D]`` reference tokens (text-embedding width ``D``).
    detail_tokens: ``[C, N, Dd]`` detail tokens (detail width ``Dd``).
    valid: ``[C]`` bool, which slots hold a concept. Invalid slots are
      ignored by the swap, whatever their (zeroed) contents.
  """
  ref_tokens: jax.Array     # [C, K, D]
  detail_tokens: jax.Array  # [C, N, Dd]
  valid: jax.Array          # [C] bool

  @classmethod
  def empty(cls, capacity: int, ref_tokens: int, width: int, detail_tokens: int,
            detail_dim: int, dtype: Any = jnp.float32) -> "ConceptBank":
    """A bank with ``capacity`` empty slots (zeros, ``valid`` all False).

    Args:
      capacity: ``C``.
      ref_tokens: ``K``.
      width: ``D``, the text encoder width.
      detail_tokens: ``N``.
      detail_dim: ``Dd``, the extractor's detail width.
      dtype: dtype of the token arrays.
    """
    return cls(ref_tokens=jnp.zeros((capacity, ref_tokens, width), dtype),
               detail_tokens=jnp.zeros((capacity, detail_tokens, detail_dim), dtype),
               valid=jnp.zeros((capacity,), bool))

  @classmethod
  def from_config(cls, config, dtype: Any = jnp.float32) -> "ConceptBank":
    """``empty`` with shapes from ``config.concepts``/``.text``/``.extractor``."""
    return cls.empty(config.concepts.capacity, config.concepts.ref_tokens,
                     config.text.width, config.concepts.detail_tokens,
                     config.extractor.detail_dim, dtype)

  @property
  def capacity(self) -> int:
    """``C`` (static)."""
    return self.valid.shape[0]

  @property
  def num_ref_tokens(self) -> int:
    """``K`` (static)."""
    return self.ref_tokens.shape[1]

  @property
  def num_valid(self) -> jax.Array:
    """Number of occupied slots, an int32 scalar array (traced under jit)."""
    return jnp.sum(self.valid.astype(jnp.int32))

  def _check_slot(self, slot) -> None:
    # A Python int is checked here; a traced slot cannot be, and an
    # out-of-range traced index is dropped by the scatter (a no-op update).
    if isinstance(slot, (int, np.integer)) and not 0 <= slot < self.capacity:
      raise IndexError(f"slot {slot} out of range for a bank of {self.capacity} slots")

  def set_slot(self, slot: int | jax.Array, ref: jax.Array,
               detail: jax.Array) -> "ConceptBank":
    """Stores a concept in ``slot`` (int or traced int32 scalar), marks it valid.

    Args:
      slot: the slot index.
      ref: ``[K, D]`` reference tokens.
      detail: ``[N, Dd]`` detail tokens.
    """
    self._check_slot(slot)
    assert ref.shape == self.ref_tokens.shape[1:], (ref.shape, self.ref_tokens.shape)
    assert detail.shape == self.detail_tokens.shape[1:], (
        detail.shape, self.detail_tokens.shape)
    return self.replace(
        ref_tokens=self.ref_tokens.at[slot].set(ref.astype(self.ref_tokens.dtype)),
        detail_tokens=self.detail_tokens.at[slot].set(detail.astype(self.detail_tokens.dtype)),
        valid=self.valid.at[slot].set(True))

  def clear_slot(self, slot: int | jax.Array) -> "ConceptBank":
    """Empties ``slot``: zeros its tokens (no stale data in checkpoints), invalid."""
    self._check_slot(slot)
    return self.replace(
        ref_tokens=self.ref_tokens.at[slot].set(0),
        detail_tokens=self.detail_tokens.at[slot].set(0),
        valid=self.valid.at[slot].set(False))


def swap_embeddings(embeds: jax.Array, token_ids: jax.Array, ref_tokens: jax.Array,
                    valid: jax.Array, *, placeholder_start: int) -> jax.Array:
  """Writes concept reference tokens over the placeholder positions.

  Position ``(b, l)`` whose id is ``placeholder_start + s`` with ``0 <= s < C``
  and ``valid[s]`` (per row: ``valid[b, s]``) receives ``ref_tokens[s, k]``,
  where ``k`` is the position's index within its run of identical ids, modulo
  ``K``; every other position is returned untouched (bit-identical, it goes
  through a select, not arithmetic).

  Args:
    embeds: ``[B, L, D]`` token embeddings or encoder states.
    token_ids: ``[B, L]`` int.
    ref_tokens: ``[C, K, D]`` shared by the batch, or ``[B, C, K, D]`` per row.
    valid: ``[C]`` or ``[B, C]`` bool, which slots may be swapped in.
    placeholder_start: id of ``<c0>`` (static).

  Returns:
    ``[B, L, D]`` in ``embeds.dtype``.
  """
  b, length, width = embeds.shape
  per_example = ref_tokens.ndim == 4
  capacity, k_tokens = ref_tokens.shape[-3], ref_tokens.shape[-2]
  assert capacity >= 1 and k_tokens >= 1, ref_tokens.shape
  assert ref_tokens.shape[-1] == width, (ref_tokens.shape, embeds.shape)
  assert token_ids.shape == (b, length), (token_ids.shape, embeds.shape)
  assert valid.shape[-1] == capacity and valid.ndim == ref_tokens.ndim - 2, (
      valid.shape, ref_tokens.shape)

  slot = token_ids.astype(jnp.int32) - placeholder_start            # [B, L]
  is_placeholder = (slot >= 0) & (slot < capacity)
  slot = jnp.clip(slot, 0, capacity - 1)     # safe index; masked out below

  # Index within the run of identical ids: a run starts where the id changes;
  # the running max of run-start positions is the current run's start.
  pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  starts = jnp.concatenate(
      [jnp.ones((b, 1), bool), token_ids[:, 1:] != token_ids[:, :-1]], axis=1)
  run_start = lax.cummax(jnp.where(starts, pos, 0), axis=1)
  k = (pos - run_start) % k_tokens                                    # [B, L]

  # A gather, not a one-hot matmul: exact in any dtype, and gradients land
  # only on the gathered rows of ref_tokens.
  if per_example:
    rows = jnp.arange(b)[:, None]
    new = ref_tokens[rows, slot, k]                                   # [B, L, D]
    ok = valid[rows, slot]                                            # [B, L]
  else:
    new = ref_tokens[slot, k]
    ok = valid[slot]
  mask = is_placeholder & ok.astype(bool)
  return jnp.where(mask[..., None], new.astype(embeds.dtype), embeds)


def _batch_refs(bank: ConceptBank, batch: int, ref_override: jax.Array,
                override_mask: jax.Array | None, override_slot: jax.Array | None
                ) -> tuple[jax.Array, jax.Array]:
  """Per-row ``([B, C, K, D], [B, C])`` refs/valid with the overrides applied."""
  refs = jnp.broadcast_to(bank.ref_tokens[None], (batch,) + bank.ref_tokens.shape)
  valid = jnp.broadcast_to(bank.valid[None], (batch, bank.capacity))
  assert ref_override.shape == (batch,) + bank.ref_tokens.shape[1:], (
      ref_override.shape, bank.ref_tokens.shape)
  use = (jnp.ones((batch,), bool) if override_mask is None
         else override_mask.astype(bool))                           # [B]
  slots = jnp.arange(bank.capacity)
  if override_slot is None:
    # The row's override stands for every placeholder it holds (training
    # captions and the target-image modes use one placeholder, <c0>).
    hit = jnp.broadcast_to(use[:, None], (batch, bank.capacity))
  else:
    hit = use[:, None] & (slots[None, :] == override_slot[:, None])  # [B, C]
  refs = jnp.where(hit[:, :, None, None],
                   ref_override[:, None].astype(refs.dtype), refs)
  return refs, valid | hit


def encode_prompt(text_encoder: nn.Module, text_params: Any, token_ids: jax.Array,
                  bank: ConceptBank, *, swap_at: str, placeholder_start: int,
                  ref_override: jax.Array | None = None,
                  override_mask: jax.Array | None = None,
                  override_slot: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """Text encoding with the concepts' reference tokens swapped in (the concept swap).

  All modes are one graph: whether a row uses the bank, an override (the
  image encoder/mapper tokens of a target image), or nothing
  (plain text, or an empty slot) is decided by masks on traced values; only
  ``swap_at`` (a config switch) and the presence of ``ref_override`` (a
  different signature) select code.

  Args:
    text_encoder: a ``TextEncoder`` (``embed_tokens`` method and
      ``__call__(ids, *, inputs_embeds)``).
    text_params: its ``params`` collection (not the ``{'params': ...}`` dict).
    token_ids: ``[B, L]`` int32 from ``PromptTokenizer.encode``.
    bank: the ``ConceptBank`` (``ref_tokens [C, K, D]``, ``valid [C]``).
    swap_at: ``'input'`` — swap token embeddings before positions and the
      transformer, so the concept is contextualised by the prompt (and
      ``pooled`` sees it); ``'output'`` — swap the final per-token states
      (``pooled``, taken at EOS, is the plain encoder's).
    placeholder_start: id of ``<c0>`` (static).
    ref_override: optional ``[B, K, D]`` per-row reference tokens replacing
      the bank's (e.g. the mapper applied to a target image).
    override_mask: optional ``[B]`` bool, rows where ``ref_override`` is used
      (default: all rows). An overridden slot counts as valid for that row.
    override_slot: optional ``[B]`` int32, the slot the override replaces;
      default: every placeholder slot of the row.

  The reference tokens live in the space ``swap_at`` names: token-embedding
  space for ``'input'``, final-state space for ``'output'`` (whoever fills
  the bank, the mapper, is trained under the same setting).

  Returns:
    ``states [B, L, D]`` and ``pooled [B, D]``, the encoder's compute dtype.
  """
  if swap_at not in SWAP_AT:
    raise ValueError(f"config.concepts.swap_at must be one of {SWAP_AT}, got {swap_at!r}")
  variables = {"params": text_params}
  if ref_override is None:
    # Shared [C, K, D] refs: no per-row copy when the bank alone is used.
    refs, valid = bank.ref_tokens, bank.valid
  else:
    refs, valid = _batch_refs(bank, token_ids.shape[0], ref_override, override_mask,
                              override_slot)
  swap = lambda x: swap_embeddings(x, token_ids, refs, valid,
                                   placeholder_start=placeholder_start)
  if swap_at == "input":
    embeds = text_encoder.apply(variables, token_ids, method="embed_tokens")
    return text_encoder.apply(variables, token_ids, inputs_embeds=swap(embeds))
  states, pooled = text_encoder.apply(variables, token_ids)
  return swap(states), pooled
