"""Concepts: the personalization database and how prompts refer to it.

``tokens`` (the prompt tokenizer with reserved placeholders ``<c0>…<c{C-1}>``,
each expanded to ``K`` positions), ``bank`` (the ``ConceptBank`` pytree and the
pure gather/select swap of reference tokens into the text encoding).

Import the submodules (``from persvid_jax.concepts import bank, tokens``):
nothing is re-exported here, so that jitted code importing ``bank`` does not
pull in ``transformers``.
"""
