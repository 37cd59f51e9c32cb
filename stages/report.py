"""Stage `report`: one evaluation report from every run of the DAG.

    python -m stages.report models reports/robustness/details.json reports   (what `dvc repro report` runs)

Reads models/<m> (train@<m>), models/linear_probe (probe), models/seeds and models/ablations, the
robustness summary and params `evaluate`, `model.seed`, `report`, `data.root`; writes
reports/summary.md, details.json, summary.json (for `dvc metrics`) and figures/. `python -m tools.readme_tables`
copies its tables into the README.
"""
import argparse
import sys
from pathlib import Path

from pipeline import params
from pipeline.errors import guarded
from pipeline.evaluation import PRIMARY
from pipeline.report import ReportParams, build, write


def main(models: str, robustness: str, out: str) -> int:
    raw = params.load()
    cfg = params.read(raw, ReportParams)
    markdown, record, groups = build(raw, models, robustness, cfg)
    write(out, markdown, record, groups, PRIMARY[record["task"]])
    for line in record["flags"]:
        print(f"report: flag: {line}")
    skipped = record["skipped_ablations"]
    print(f"report: {len(groups)} models, {len(record['ablations'])} ablations"
          + (f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else "") + f" -> {Path(out) / 'summary.md'}")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("models", help="the models folder (train@<model>, the linear probe, seeds/ and ablations/)")
    cli.add_argument("robustness", help="details.json written by the robustness stage")
    cli.add_argument("out", help="the reports folder to write")
    args = cli.parse_args()
    sys.exit(guarded("report", main, args.models, args.robustness, args.out))
