"""mini-ImageNet (Vinyals et al. 2016) with the Ravi & Larochelle (2017) class split.

Two layouts are read from ``--data_dir`` (first found wins):

* the pickle cache ``mini-imagenet-cache-{train,val,test}.pkl``: a dict with ``image_data``
  uint8 ``[N, 84, 84, 3]`` and ``class_dict`` ``{wnid: [row indices]}``;
* the CSV layout ``images/<file>.jpg`` plus ``{train,val,test}.csv`` (``filename,label``).

Either gives uint8 ``[C, D, 84, 84, 3]``: classes in the file's order of first appearance,
D images per class (all classes must have the same D).
"""

from __future__ import annotations

import csv
import functools
import os
import pickle

import numpy as np

from maml_tf.data.errors import DataError

SIZE = 84


def load_split(data_dir: str, split: str) -> np.ndarray:
    """uint8 ``[C, D, 84, 84, 3]`` images of one split."""
    return _load(data_dir, split)[1]


def class_names(data_dir: str, split: str) -> list[str]:
    """The wnids of a split's classes, in the order of ``load_split``."""
    return _load(data_dir, split)[0]


@functools.lru_cache(maxsize=4)
def _load(data_dir: str, split: str) -> tuple[list[str], np.ndarray]:
    data_dir = data_dir or os.environ.get("MAML_TF_MINI_IMAGENET_DIR", "")
    pkl = os.path.join(data_dir, f"mini-imagenet-cache-{split}.pkl")
    csv_path = os.path.join(data_dir, f"{split}.csv")
    if data_dir and os.path.exists(pkl):
        return _from_pickle(pkl)
    if data_dir and os.path.exists(csv_path):
        return _from_csv(data_dir, csv_path)
    raise DataError(
        f"mini-ImageNet split '{split}' was not found in --data_dir={data_dir!r}: expected "
        f"{os.path.basename(pkl)} or {split}.csv with an images/ folder (the Ravi & Larochelle "
        "layout). Download mini-ImageNet and pass its folder as --data_dir.")


def _stack(groups: dict[str, list[np.ndarray]], source: str) -> tuple[list[str], np.ndarray]:
    sizes = {len(v) for v in groups.values()}
    if len(sizes) != 1:
        raise DataError(f"{source}: classes have different numbers of images {sorted(sizes)}; "
                        "every class needs the same count.")
    out = np.stack([np.stack(v) for v in groups.values()])
    if out.shape[2:] != (SIZE, SIZE, 3):
        raise DataError(f"{source}: images are {out.shape[2:]}, expected ({SIZE}, {SIZE}, 3).")
    return list(groups), out.astype(np.uint8)


def _from_pickle(path: str) -> tuple[list[str], np.ndarray]:
    try:
        with open(path, "rb") as f:
            cache = pickle.load(f)
        images, classes = cache["image_data"], cache["class_dict"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as e:
        raise DataError(f"{path} is corrupt or not a mini-ImageNet cache ({type(e).__name__}: "
                        f"{e}); it must hold 'image_data' and 'class_dict'.") from e
    return _stack({c: [images[i] for i in rows] for c, rows in classes.items()}, path)


def _from_csv(data_dir: str, csv_path: str) -> tuple[list[str], np.ndarray]:
    from PIL import Image
    groups: dict[str, list[np.ndarray]] = {}
    rows = _read_rows(csv_path)
    for row in rows:
        path = os.path.join(data_dir, "images", row["filename"])
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read {path} listed in {csv_path}: {e}") from e
        if img.size != (SIZE, SIZE):
            img = img.resize((SIZE, SIZE), Image.Resampling.BILINEAR)
        groups.setdefault(row["label"], []).append(np.asarray(img))
    return _stack(groups, csv_path)


def _read_rows(csv_path: str) -> list[dict]:
    """The rows of a split's CSV; a ``DataError`` names the line that is not UTF-8 text or
    lacks a file name or a label."""
    with open(csv_path, "rb") as f:
        raw = f.read()
    for number, line in enumerate(raw.splitlines(), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{csv_path} line {number} is not UTF-8 text ({e.reason} at byte "
                            f"{e.start}: {line[:60]!r}); fix or remove that line.") from None
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    if not rows or set(rows[0]) != {"filename", "label"}:
        raise DataError(f"{csv_path} must have the header 'filename,label'.")
    for number, row in enumerate(rows, 2):   # line 1 is the header
        if not (row.get("filename") or "").strip() or not (row.get("label") or "").strip():
            raise DataError(f"{csv_path} line {number} ({','.join(v or '' for v in row.values())!r}) "
                            "needs a file name and a label: 'filename,label'.")
    return rows
