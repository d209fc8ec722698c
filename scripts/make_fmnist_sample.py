#!/usr/bin/env python3
"""Build the small Fashion-MNIST sample embedded in ``maepl/assets/fashion_mnist_sample``.

The sample lets the test-suite and the quick-start run without any download: it holds the
first 1,000 training images of each class (10,000) and the first 200 test images of each
class (2,000), in their original order, in the standard idx format, gzip-compressed.

Source: Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``),
which installs the original Zalando idx files under ``/usr/share/datasets/fashion-mnist``.

The script is self-contained (it does not import ``maepl``) so it can be run from a bare
checkout: ``python3 scripts/make_fmnist_sample.py``. Output is byte-for-byte reproducible:
gzip headers are written with ``mtime=0`` and no file name.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import struct
from pathlib import Path

import numpy as np

DEFAULT_SRC = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "maepl" / "assets" / "fashion_mnist_sample"
LICENSE_FILE = Path("/usr/share/doc/dataset-fashion-mnist/copyright")

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Used only if the Debian copyright file is missing; it is the same Expat text.
EXPAT_BODY = """\
Permission is hereby granted, free of charge, to any person obtaining a
copy of this software and associated documentation files (the "Software"),
to deal in the Software without restriction, including without limitation
the rights to use, copy, modify, merge, publish, distribute, sublicense,
and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included
in all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS
OR IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF
MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT.
IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT,
TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE
SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
"""


def read_ubyte_idx(path: Path) -> np.ndarray:
    """Read a gzip-compressed unsigned-byte idx file (the only kind Fashion-MNIST uses)."""
    raw = gzip.decompress(path.read_bytes())
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim < 1:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape} but body has {len(body)} bytes")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def write_ubyte_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzip idx file; mtime=0 and no name keep output reproducible."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(header + array.tobytes())
    path.write_bytes(buf.getvalue())


def first_per_class(labels: np.ndarray, per_class: int) -> np.ndarray:
    """Indices of the first ``per_class`` samples of every class, in original dataset order."""
    picked = []
    for cls in range(len(CLASSES)):
        idx = np.flatnonzero(labels == cls)[:per_class]
        if len(idx) < per_class:
            raise ValueError(f"class {cls} has only {len(idx)} samples, need {per_class}")
        picked.append(idx)
    # Sorting the union restores the original interleaved order of the source file.
    return np.sort(np.concatenate(picked))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def license_text() -> str:
    """The Expat text, taken from Debian's copyright file when available."""
    body = EXPAT_BODY
    if LICENSE_FILE.exists():
        text = LICENSE_FILE.read_text(encoding="utf-8")
        marker = "License: Expat\n"
        start = text.rfind(marker)  # the last stanza holds the full license body
        if start >= 0:
            lines = text[start + len(marker) :].splitlines()
            # Debian copyright format: body lines are indented by one space, "." = blank line.
            body = "\n".join("" if ln.strip() == "." else ln.strip() for ln in lines).strip() + "\n"
    return "MIT License (Expat)\n\nCopyright (c) 2017 Zalando SE\n\n" + body


def write_readme(out: Path, src: Path, counts: dict[str, int], sources: dict[str, str]) -> None:
    class_rows = "\n".join(f"| {i} | {name} |" for i, name in enumerate(CLASSES))
    files = sorted(p for p in out.glob("*.gz"))
    file_rows = "\n".join(f"| `{p.name}` | {p.stat().st_size:,} | `{sha256(p)}` |" for p in files)
    src_rows = "\n".join(f"| `{name}` | `{digest}` |" for name, digest in sorted(sources.items()))
    text = f"""# Fashion-MNIST sample

A small, fixed subset of [Fashion-MNIST](https://github.com/zalandoresearch/fashion-mnist)
by Zalando Research, embedded in `maepl` so that tests and the quick-start run offline.
For the full 70,000 images use the `fashion-mnist` dataset instead of `sample`.

## Selection

- **train**: the first 1,000 images of each of the 10 classes from the original 60,000-image
  training set, kept in their original order: {counts["train"]:,} images.
- **t10k** (test): the first 200 images of each class from the original 10,000-image test set,
  kept in their original order: {counts["t10k"]:,} images.

Images are 28x28 grayscale (uint8), labels are uint8 class indices. The files use the original
idx format (`train-images-idx3-ubyte.gz`, `train-labels-idx1-ubyte.gz`,
`t10k-images-idx3-ubyte.gz`, `t10k-labels-idx1-ubyte.gz`), gzip-compressed with `mtime=0`.

Generated by `scripts/make_fmnist_sample.py` from Debian's `dataset-fashion-mnist` package
(`{src}`); re-running it reproduces these files byte for byte.

## Classes

| Label | Name |
|------:|------|
{class_rows}

## Files

| File | Bytes | SHA-256 |
|------|------:|---------|
{file_rows}

Source files used (SHA-256):

| File | SHA-256 |
|------|---------|
{src_rows}

## Source and citation

Han Xiao, Kashif Rasul, Roland Vollgraf. *Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms.* 2017. arXiv:1708.07747.
<https://github.com/zalandoresearch/fashion-mnist>

## License

```
{license_text()}```
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--src", type=Path, default=DEFAULT_SRC, help="folder with the idx .gz files"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    sources: dict[str, str] = {}
    for split, per_class in (("train", args.train_per_class), ("t10k", args.test_per_class)):
        img_path = args.src / f"{split}-images-idx3-ubyte.gz"
        lbl_path = args.src / f"{split}-labels-idx1-ubyte.gz"
        images, labels = read_ubyte_idx(img_path), read_ubyte_idx(lbl_path)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"{split}: {images.shape[0]} images but {labels.shape[0]} labels")
        keep = first_per_class(labels, per_class)
        write_ubyte_idx(args.out / img_path.name, images[keep])
        write_ubyte_idx(args.out / lbl_path.name, labels[keep])
        counts[split] = len(keep)
        sources[img_path.name] = sha256(img_path)
        sources[lbl_path.name] = sha256(lbl_path)
        print(f"{split}: kept {len(keep)} of {len(labels)} images")
    write_readme(args.out, args.src, counts, sources)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
