"""Model construction: ``get_model(config)`` returns a built ``keras.Sequential``."""

from __future__ import annotations

import keras

from maml_tf.models import zoo


def get_model(config, dtype: str = "float32") -> keras.Sequential:
    """The paper's network for ``config.dataset``, built and ready for ``FunctionalModel``."""
    if config.is_regression:
        # cbfinn/maml's truncated normal (stddev 0.01): measured here, it keeps 1..10 inner
        # steps stable at alpha = 0.01, where Glorot's init let some 5-shot tasks diverge.
        return zoo.mlp(1, [40, 40], 1, dtype=dtype,
                       kernel_initializer=keras.initializers.TruncatedNormal(stddev=0.01))
    if config.model_name == "mlp":
        # The paper's non-convolutional Omniglot network: 256-128-64-64 with batch norm.
        h, w, c = config.image_shape
        return _flattened(zoo.mlp(h * w * c, [256, 128, 64, 64], config.way, batch_norm=True,
                                  dtype=dtype), config.image_shape, dtype)
    return zoo.conv4(config.image_shape, config.way, filters=config.filters, pool=config.pool,
                     dtype=dtype, norm=config.norm)


def _flattened(mlp: keras.Sequential, image_shape, dtype) -> keras.Sequential:
    from maml_tf.models.layers import Flatten
    return keras.Sequential([keras.Input(tuple(image_shape), dtype=dtype),
                             Flatten(dtype=dtype, name="flatten")] + mlp.layers, name="mlp")
