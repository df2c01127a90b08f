"""Writes the Omniglot npz arrays (../shared/data/omniglot) as an image folder tree, with a
splits.json of one of maml_tf's Omniglot splits, so that the generic folder path
(--dataset=folder) can be checked against the dedicated loader on real data.

    python runs/own_data/omniglot_as_folders.py --data_dir=../shared/data/omniglot \\
        --out=$HOME/omniglot_folders --split=cbfinn

Layout: <out>/<part>/character<NNNN>/<NNNN>_<DD>.png, black strokes on white paper as in the
official release (the npz files keep no alphabet names, so the characters are numbered in
the official character-id order; NNNN = 1..1623 over background then evaluation).
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
from PIL import Image

from maml_tf.data import omniglot


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="cbfinn", choices=sorted(omniglot.SPLITS) + ["lake"])
    args = parser.parse_args()
    raw = omniglot.load_raw(args.data_dir, "npz")
    names = []
    for part in omniglot.PARTS:
        for drawings in raw[part]:
            number = len(names) + 1
            name = f"{part}/character{number:04d}"
            names.append(name)
            os.makedirs(os.path.join(args.out, name), exist_ok=True)
            for d, paper in enumerate(drawings):
                # bool, True = paper -> 8-bit grayscale with white paper, as the official PNGs.
                Image.fromarray(paper.astype(np.uint8) * 255).save(
                    os.path.join(args.out, name, f"{number:04d}_{d + 1:02d}.png"))
    splits = {s: [names[i] for i in idx] for s, idx in omniglot.split_indices(args.split).items()}
    with open(os.path.join(args.out, "splits.json"), "w") as f:
        json.dump(splits, f, indent=0)
    print(f"wrote {len(names)} characters x 20 drawings to {args.out} "
          f"({', '.join(f'{s} {len(v)}' for s, v in splits.items())} classes, split {args.split})")


if __name__ == "__main__":
    main()
