"""Paste the latest benchmark or robustness report into its page of docs/, between its markers.

.venv/bin/python scripts/update_docs.py bench        # after `make bench`: docs/benchmark.md
.venv/bin/python scripts/update_docs.py robustness   # after `make robustness`: docs/robustness.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench() -> str:
    from resnet_bench.report import render_table

    result = json.loads((ROOT / "bench/bench.json").read_text())
    return f"![benchmark chart](../bench/bench.png)\n\n{render_table(result)}"


def _robustness() -> str:
    from resnet_bench.robustness import render_table

    return render_table(json.loads((ROOT / "bench/robustness.json").read_text()))


SECTIONS = {"bench": _bench, "robustness": _robustness}
PAGES = {"bench": ROOT / "docs/benchmark.md", "robustness": ROOT / "docs/robustness.md"}


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else ""
    if name not in SECTIONS:
        raise SystemExit(f"usage: update_docs.py {{{'|'.join(SECTIONS)}}}")
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    page = PAGES[name]
    head, rest = page.read_text().split(start, 1)
    _, tail = rest.split(end, 1)
    page.write_text(f"{head}{start}\n{SECTIONS[name]()}\n{end}{tail}")
    print(f"{page.relative_to(ROOT)}: {name} section updated")


if __name__ == "__main__":
    main()
