"""Copy the evaluation report's tables into a Markdown file, between markers: results are never pasted by hand.

    python -m tools.readme_tables NAME SUMMARY [--into FILE]      # FILE: README.md unless given (--readme: the same)

The results come from summaries committed under results/ (a report's reports/summary.md, copied there;
docs/results.md says how each is made). Two commands per corpus: the headline block in the README and
the full block in docs/results.md:

    python -m tools.readme_tables demo results/demo/summary.md
    python -m tools.readme_tables demo-full results/demo/summary.md --into docs/results.md
    python -m tools.readme_tables mosi results/mosi-text/summary.md
    python -m tools.readme_tables mosi-full results/mosi-text/summary.md --into docs/results.md

and the measurements of docs/models.md (`python -m tools.variants ... --md relation.md`):

    python -m tools.readme_tables variants-relation relation.md --into docs/models.md

A file holds one block per report and table selection:

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


def splice(readme: str, name: str, summary: str, source: str, into: str = "README.md") -> str:
    """The text of Markdown file `into` (`readme`) with block `name` regenerated from the summary text."""
    block = next((m for m in BLOCK.finditer(readme) if m["name"] == name), None)
    if block is None:
        raise SpliceError(f"no block '<!-- report: {name} ... -->' ... '<!-- /report: {name} -->' in {into}")
    found = tables(summary)
    wanted = [t.strip() for t in (block["tables"] or ",".join(found)).split(",") if t.strip()]
    missing = [t for t in wanted if t not in found]
    if missing:
        raise SpliceError(f"{source} has no table {', '.join(missing)} (it has: {', '.join(found) or 'none'})")
    intro = next((p for p in summary.split("\n\n") if p.startswith("Data ")), "").strip()
    command = f"python -m tools.readme_tables {name} {source}" + ("" if into == "README.md" else f" --into {into}")
    body = [f"_Generated from `{source}` by `{command}`; do not edit by hand._",
            intro] + [found[t] for t in wanted]
    text = "\n\n".join(p for p in body if p) + "\n"
    return readme[:block.start("body")] + text + readme[block.end("body"):]


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("name", help="the block to regenerate")
    cli.add_argument("summary", help="a summary.md written by the report stage (results/<corpus>/summary.md)")
    cli.add_argument("--into", "--readme", dest="into", default="README.md", metavar="FILE",
                     help="the Markdown file that holds the block (default README.md; --readme is the same option)")
    args = cli.parse_args(argv)
    try:
        readme = Path(args.into).read_text()
        updated = splice(readme, args.name, Path(args.summary).read_text(), args.summary, args.into)
    except (OSError, SpliceError) as err:
        print(f"readme_tables: {err}", file=sys.stderr)
        return 2
    Path(args.into).write_text(updated)
    print(f"readme_tables: {args.into} block '{args.name}' {'unchanged' if updated == readme else 'updated'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
