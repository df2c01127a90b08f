"""The zoo's Omniglot Conv-4 written with standard ``keras.layers`` (what a user would
write), for ``meta_step.py --models``: maml_tf runs it through ``models.keras_layers``."""

import keras


def conv4(input_shape, num_outputs, filters=64):
    inputs = x = keras.Input(input_shape)
    for i in range(4):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", use_bias=False,
                                name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(num_outputs, name="head")(x))
