"""The ``tag`` command's flags (no heavy imports: the CLI builds every parser at start)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(tag: argparse.ArgumentParser) -> None:
    tag.add_argument(
        "sources",
        nargs="*",
        metavar="SOURCE",
        help="folders (recursive), files, globs ('photos/**/*.jpg') or URIs (s3://bucket/prefix)",
    )
    tag.add_argument("--out", type=Path, required=True, help="output folder (created)")
    tag.add_argument(
        "--manifest",
        type=Path,
        action="append",
        default=[],
        help="a file naming the inputs: one path or URI a line, or a .csv / .parquet file's "
        "--column; relative paths are read from the manifest's folder (repeatable)",
    )
    tag.add_argument("--column", default="path", help="the manifest's column of paths")
    tag.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    tag.add_argument("-k", "--top-k", type=int, default=None, help="labels per image")
    tag.add_argument("--embed", action="store_true", help="add the 512-d embedding column")
    tag.add_argument(
        "--repository", type=Path, help="take the model from this model repository (--model)"
    )
    tag.add_argument("--model", dest="model_name", help="the repository's model to use")
    tag.add_argument(
        "--model-version", type=int, help="that model's version (default: the newest served)"
    )
    tag.add_argument(
        "--processes",
        type=int,
        default=0,
        help="worker processes (0: one per usable CPU); with --ray, actors (0: one per CPU of "
        "the cluster)",
    )
    tag.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on this Ray cluster through Ray Data ('auto': the one this machine is part "
        "of; ray://host:10001 for a remote one); the driver lists and commits",
    )
    tag.add_argument(
        "--commit-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="commit a part at least this often (a crash re-does at most this much)",
    )
    tag.add_argument(
        "--commit-rows", type=int, default=1000, help="...or once this many rows are done"
    )
    tag.add_argument("--overwrite", action="store_true", help="delete --out's results first")
    tag.add_argument(
        "--allow-model-change",
        action="store_true",
        help="add rows of this model to an output made with another one",
    )
    tag.add_argument(
        "--error-rows-ok",
        action="store_true",
        help="exit 0, not 3, when the job completed with error rows (for schedulers that "
        "count 3 as a failure; the rows still say what failed)",
    )
    tag.add_argument("--no-progress", action="store_true", help="no progress bar")
