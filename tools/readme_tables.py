"""Copy the evaluation report's tables into the README, between markers: results are never pasted by hand.

    python -m tools.readme_tables demo reports/summary.md                 # after `dvc repro report` on the demo
    python -m tools.readme_tables mosi ../mosi-run/reports/summary.md     # a report made elsewhere

The README holds one block per report:

    <!-- report: demo (tables: models, ablations, robustness) -->
    ...replaced on every run...
    <!-- /report: demo -->

and each named table is taken from between `<!-- table: NAME -->` and `<!-- /table -->` in the
summary (see pipeline/evaluation/report.py), after the summary's first paragraph (data, hashes, seeds).
Running it twice changes nothing.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

BLOCK = re.compile(r"<!-- report: (?P<name>[\w.-]+)(?: \(tables: (?P<tables>[^)]*)\))? -->\n(?P<body>.*?)"
                   r"<!-- /report: (?P=name) -->", re.S)
TABLE = re.compile(r"<!-- table: (?P<name>[\w.-]+) -->\n(?P<body>.*?)<!-- /table -->", re.S)


class SpliceError(ValueError):
    pass


def tables(summary: str) -> dict[str, str]:
    return {m["name"]: m["body"].strip() for m in TABLE.finditer(summary)}


def splice(readme: str, name: str, summary: str, source: str) -> str:
    """The README with block `name` regenerated from the summary text."""
    block = next((m for m in BLOCK.finditer(readme) if m["name"] == name), None)
    if block is None:
        raise SpliceError(f"no block '<!-- report: {name} ... -->' ... '<!-- /report: {name} -->' in the README")
    found = tables(summary)
    wanted = [t.strip() for t in (block["tables"] or ",".join(found)).split(",") if t.strip()]
    missing = [t for t in wanted if t not in found]
    if missing:
        raise SpliceError(f"{source} has no table {', '.join(missing)} (it has: {', '.join(found) or 'none'})")
    intro = next((p for p in summary.split("\n\n") if p.startswith("Data ")), "").strip()
    body = [f"_Generated from `{source}` by `python -m tools.readme_tables {name} {source}`; do not edit by hand._",
            intro] + [found[t] for t in wanted]
    text = "\n\n".join(p for p in body if p) + "\n"
    return readme[:block.start("body")] + text + readme[block.end("body"):]


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("name", help="the README block to regenerate")
    cli.add_argument("summary", help="reports/summary.md written by the report stage")
    cli.add_argument("--readme", default="README.md")
    args = cli.parse_args(argv)
    try:
        readme = Path(args.readme).read_text()
        updated = splice(readme, args.name, Path(args.summary).read_text(), args.summary)
    except (OSError, SpliceError) as err:
        print(f"readme_tables: {err}", file=sys.stderr)
        return 2
    Path(args.readme).write_text(updated)
    print(f"readme_tables: {args.readme} block '{args.name}' {'unchanged' if updated == readme else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
