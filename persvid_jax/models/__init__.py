"""The networks of the method, as Flax linen modules (pure functions of params).

``text_encoder`` (first encoder), ``image_encoder`` (second encoder),
``mapper`` (image features -> K pseudo-words), ``extractor`` (subject image ->
N detail tokens), ``unet3d`` (the base and SR generators), ``attention``
(shared attention and projection primitives).
"""
