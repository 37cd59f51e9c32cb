"""Stage `report`: one evaluation report from every run of the DAG, and the DVC metrics.

    python -m stages.report models reports/robustness/details.json reports metrics   (what `dvc repro report` runs)

Reads models/<m> (train@<m>), models/linear_probe (probe), models/seeds and models/ablations, the
robustness summary and all of params.yaml (the report names the params that differ from HEAD's and
every model's hyperparameters); writes reports/summary.md (+ summary.json, details.json, figures/) and
metrics/, one small JSON per number keyed by model, which `dvc metrics` and `dvc exp show` compare
(pipeline/evaluation/experiment.py). `python -m tools.readme_tables` copies the report's tables into the README.
"""
import argparse
import json
import sys
from pathlib import Path

from pipeline.evaluation import experiment, runs
from pipeline import params
from pipeline.errors import guarded
from pipeline.evaluation.stats import PRIMARY
from pipeline.evaluation.report import ReportParams, build, write


def main(models: str, robustness: str, out: str, metrics: str) -> int:
    raw = params.load()
    cfg = params.read(raw, ReportParams)
    markdown, record, groups = build(raw, models, robustness, cfg)
    sections = ["probe" if g == runs.PROBE else g for g in groups]  # each model's own params section
    this_run = experiment.run_section(raw, experiment.committed_params(), sections)
    head, flags, rest = markdown.partition("\n## Flags")  # "This run" right under the report's title lines
    markdown = f"{head}\n{this_run}{flags}{rest}" if flags else f"{markdown}\n{this_run}"
    write(out, markdown, record, groups, PRIMARY[record["task"]])
    found = json.loads(Path(robustness).read_text()) if Path(robustness).is_file() else None
    experiment.write_lean(metrics, experiment.lean_metrics({g: groups[g].runs for g in groups}, found))
    for line in record["flags"]:
        print(f"report: flag: {line}")
    skipped = record["skipped_ablations"]
    print(f"report: {len(groups)} models, {len(record['ablations'])} ablations"
          + (f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else "")
          + f" -> {Path(out) / 'summary.md'}, {metrics}/")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("models", help="the models folder (train@<model>, the linear probe, seeds/ and ablations/)")
    cli.add_argument("robustness", help="details.json written by the robustness stage")
    cli.add_argument("out", help="the reports folder to write")
    cli.add_argument("metrics", help="the folder of DVC metrics to write (one JSON per number, keyed by model)")
    args = cli.parse_args()
    sys.exit(guarded("report", main, args.models, args.robustness, args.out, args.metrics))
