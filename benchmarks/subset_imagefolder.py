#!/usr/bin/env python
"""A smaller ImageFolder data set made of links: the first N training images of each class (sorted by file
name), and the whole test split, so a CPU study can afford its epochs and still test on every test image.

Usage: python benchmarks/subset_imagefolder.py SRC DST --train-per-class 2000
(SRC and DST hold train/<class>/<image> and test/<class>/<image>; an existing DST made with the same N is kept.)
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--train-per-class", type=int, required=True)
    args = p.parse_args(argv)
    if not ((args.src / "train").is_dir() and (args.src / "test").is_dir()):
        sys.exit(f"{args.src} has no train/ and test/ ImageFolder trees")
    if args.train_per_class < 1:
        sys.exit("--train-per-class must be at least 1")
    stamp = args.dst / ".subset"
    wanted = f"{args.src.resolve()} {args.train_per_class}\n"
    if stamp.is_file():
        if stamp.read_text() != wanted:
            sys.exit(f"{args.dst} holds another subset ({stamp.read_text().strip()}); choose another folder")
        print(f"{args.dst}: kept ({wanted.strip()})")
        return 0
    if args.dst.exists() and any(args.dst.iterdir()):
        sys.exit(f"{args.dst} exists and is not a subset made by this script")
    tmp = args.dst.with_name(args.dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)  # what an interrupted run left, maybe for another N
    for split, limit in (("train", args.train_per_class), ("test", None)):
        for cls in sorted(d for d in (args.src / split).iterdir() if d.is_dir()):
            out = tmp / split / cls.name
            out.mkdir(parents=True, exist_ok=True)
            for image in sorted(f for f in cls.iterdir() if f.is_file())[:limit]:
                link = out / image.name
                if not link.exists():
                    os.symlink(image.resolve(), link)
    (tmp / ".subset").write_text(wanted)
    if args.dst.exists():
        args.dst.rmdir()
    tmp.rename(args.dst)  # whole or not at all
    print(f"{args.dst}: {args.train_per_class} training images per class, the whole test split")
    return 0


if __name__ == "__main__":
    sys.exit(main())
