"""Pretrained weights in other layouts -> our params (no pickle, strict checks).

* ``safetensors_io``: read ``.safetensors`` files (memory-mapped, bf16/fp16/fp32)
  and a source directory's ``config.json``; pickle formats are refused.
* ``clip``: ``transformers`` CLIP text / vision towers -> ``text_encoder`` /
  ``image_encoder``.
* ``unet3d``: diffusers ``UNet3DConditionModel`` (ModelScope / Zeroscope) ->
  ``unet`` / ``sr_unet``.

Every conversion ends in ``assemble``: the renamed tensors are checked against
``jax.eval_shape`` of our init and any missing, unexpected, mis-shaped or
non-float tensor raises ``ConvertError`` naming them.
"""

from persvid_jax.convert.common import ConvertError, assemble  # noqa: F401
