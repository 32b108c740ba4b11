"""Paste the latest benchmark (bench/results/bench.json) into README.md between its markers.

Run after `make bench`: .venv/bin/python scripts/update_readme_bench.py
"""

from __future__ import annotations

import json
from pathlib import Path

from resnet_service.benchmark.report import render_table

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def main() -> None:
    result = json.loads((ROOT / "bench/results/bench.json").read_text())
    readme = (ROOT / "README.md").read_text()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    block = f"{START}\n![benchmark chart](bench/results/bench.png)\n\n{render_table(result)}\n{END}"
    (ROOT / "README.md").write_text(head + block + tail)
    print("README.md updated from bench/results/bench.json")


if __name__ == "__main__":
    main()
