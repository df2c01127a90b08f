"""Lays the mini-ImageNet CSV layout (images/ + train/val/test.csv) out as an image folder
tree of symbolic links, <out>/<split>/<wnid>/<file>.jpg, so that the generic folder path
(--dataset=folder, splits from the train/val/test folders) reads the same images.

    python runs/own_data/mini_imagenet_as_folders.py --data_dir=../shared/data/mini_imagenet_sample \\
        --out=$HOME/mini_imagenet_folders
"""

from __future__ import annotations

import argparse
import csv
import os


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    data_dir = os.path.abspath(args.data_dir)
    count = 0
    for split in ("train", "val", "test"):
        with open(os.path.join(data_dir, f"{split}.csv")) as f:
            for row in csv.DictReader(f):
                folder = os.path.join(args.out, split, row["label"])
                os.makedirs(folder, exist_ok=True)
                link = os.path.join(folder, row["filename"])
                if not os.path.lexists(link):
                    os.symlink(os.path.join(data_dir, "images", row["filename"]), link)
                count += 1
    print(f"linked {count} images into {args.out}")


if __name__ == "__main__":
    main()
