#!/usr/bin/env python3
"""Publishes a full `make bench` run: copies summary.md, overview.md and the plots from RESULTS_DIR to
docs/benchmarks/ and replaces the README's benchmark table (between the bench:overview markers) with overview.md.

usage: update_readme.py RESULTS_DIR    (run from the repository root; `make bench-readme` does both steps)
"""
import os
import shutil
import sys

START, END = "<!-- bench:overview:start -->", "<!-- bench:overview:end -->"
FILES = ["summary.md", "overview.md", "time.png", "memory.png", "sparse.png", "gflops.png"]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    results = sys.argv[1]
    missing = [f for f in FILES if not os.path.exists(os.path.join(results, f))]
    if missing:
        sys.exit(f"{results} lacks {', '.join(missing)}: run `make bench` first")
    os.makedirs("docs/benchmarks", exist_ok=True)
    for f in FILES:
        shutil.copy(os.path.join(results, f), os.path.join("docs/benchmarks", f))
    with open("README.md") as f:
        readme = f.read()
    if START not in readme or END not in readme:
        sys.exit(f"README.md lacks the markers {START} and {END}")
    with open(os.path.join(results, "overview.md")) as f:
        table = f.read().strip()
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    with open("README.md", "w") as f:
        f.write(head + START + "\n" + table.replace("`summary.md`", "[`summary.md`](docs/benchmarks/summary.md)") +
                "\n" + END + tail)
    print("updated README.md and docs/benchmarks/ from", results)


if __name__ == "__main__":
    main()
