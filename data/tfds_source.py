"""Any TFDS image-classification data set as few-shot classes: ``--dataset=tfds:<name>``.

All of the builder's splits are pooled (few-shot splits are classes, not examples), the
label ``--label_key`` (``label`` by default; e.g. ``coarse_label`` for CIFAR-100's 20
super-classes) names the classes (its ``ClassLabel`` names where it has them), and the
first image feature gives the pixels, converted and resized as ``data/folder.py`` says.
The data must be prepared in the TFDS data directory (``--data_dir``, else TFDS's default);
it is decoded once into the cache of ``data/sources.py``.
"""

from __future__ import annotations

import difflib
import os

import numpy as np

from maml_tf.data import folder, sources
from maml_tf.data.errors import DataError
from maml_tf.data.rowfile import RowFile

DECODE_VERSION = 1


def load(config):
    """``(classes, None, key, description)`` of ``config.dataset`` = ``tfds:<name>``."""
    import tensorflow_datasets as tfds
    name = config.dataset.split(":", 1)[1]
    builder = _builder(tfds, name, config.data_dir)
    features = builder.info.features
    if config.label_key not in features:
        raise DataError(f"TFDS {name} has no feature {config.label_key!r} (--label_key); its "
                        f"features are {', '.join(sorted(features))}.")
    image_keys = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    if not image_keys:
        raise DataError(f"TFDS {name} has no image feature ({', '.join(sorted(features))}); "
                        "it is not an image-classification data set.")
    label_feature = features[config.label_key]
    names = list(getattr(label_feature, "names", None) or [])
    size, _, channels = config.image_shape
    splits = {s: int(info.num_examples) for s, info in builder.info.splits.items()}
    where = {"source": f"tfds {name}", "data_dir": builder.data_dir, "size": size,
             "channels": channels, "label": config.label_key, "decode": DECODE_VERSION}
    what = {**{k: v for k, v in where.items() if k != "data_dir"},
            "version": str(builder.version), "splits": splits}
    # Few-shot splits are classes: every example of every split of the builder.
    everything = "+".join(sorted(splits)) if splits else "all"

    def build(allocate):
        staging = os.path.join(cache_root_of(config), f"tfds-{os.getpid()}.staging")
        labels = []
        try:
            # In arrival order first (the count is only known at the end), then in class order.
            with open(staging, "wb") as f:
                for ex in _examples(builder, name, everything):
                    image = ex[image_keys[0]]
                    image = image if image.ndim == 3 else image[..., None]
                    f.write(folder.resize(folder.to_channels(image, channels), size).tobytes())
                    label = ex[config.label_key]
                    labels.append(label.decode() if isinstance(label, bytes) else label)
            if not labels:
                raise DataError(f"TFDS {name} ({everything}) holds no examples.")
            arrival = RowFile.raw(staging, (len(labels), size, size, channels))
            values, class_of = np.unique(np.asarray(labels), return_inverse=True)
            order = np.argsort(class_of, kind="stable")   # a class's examples in data order
            rows = allocate(len(order))
            for start in range(0, len(order), 4096):
                rows[start:start + 4096] = arrival[order[start:start + 4096]]
            arrival.close()
        finally:
            if os.path.exists(staging):
                os.remove(staging)
        class_names = [names[int(v)] if names and str(v).isdigit() and int(v) < len(names)
                       else str(v) for v in values]
        return class_names, rows, class_of[order]

    classes, key = sources.cached(config.cache_dir, where, what, (size, size, channels), build)
    return classes, None, key, {"tfds": name, "tfds_version": str(builder.version)}


def cache_root_of(config) -> str:
    root = sources.cache_root(config.cache_dir)
    os.makedirs(root, exist_ok=True)
    return root


def _examples(builder, name: str, split: str):
    try:
        dataset = builder.as_dataset(split=split, shuffle_files=False)
    except AssertionError as e:   # TFDS's way of saying the data was never prepared
        raise DataError(
            f"TFDS {name} is not prepared in {builder.data_dir} ({str(e).splitlines()[0][:120]}). "
            "This machine cannot download it: prepare it where there is internet (python -c "
            f"\"import tensorflow_datasets as tfds; tfds.builder('{name}').download_and_prepare()\") "
            "and copy the folder, or pass the TFDS data directory that holds it as "
            "--data_dir.") from None
    return dataset.as_numpy_iterator()


def _builder(tfds, name: str, data_dir: str):
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:   # DatasetNotFoundError and friends
        if type(e).__name__ != "DatasetNotFoundError":
            raise DataError(f"TFDS could not open {name!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0]}") from None
        known = tfds.list_builders()
        close = difflib.get_close_matches(name, known, n=5)
        raise DataError(f"TFDS has no data set {name!r}"
                        f"{'; did you mean ' + ', '.join(close) + '?' if close else '.'} "
                        "Image-classification sets include cifar100, cifar10, mnist, omniglot, "
                        "caltech_birds2011, imagenet2012 (tfds.list_builders() lists all "
                        f"{len(known)}).") from None
    return builder
