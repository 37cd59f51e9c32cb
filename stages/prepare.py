"""Stage `prepare`: raw corpus -> manifest + rejects.

    python -m stages.prepare features/manifest.parquet features/rejects.csv     (what `dvc repro prepare` runs)

Reads params `data.*`. Every label row and media file is either a manifest row or a line in the
rejects CSV with its reason; `data.strict: true` makes any reject fail the stage.
"""
import argparse
import json
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import params
from pipeline.cache import atomic_write
from pipeline.errors import UserError, guarded
from pipeline.data.prepare import DataParams, read, summary


def main(manifest_path: str, rejects_path: str) -> int:
    for stale in (manifest_path, rejects_path):  # a failed run must not leave the last run's lists looking current
        Path(stale).unlink(missing_ok=True)
    data = params.read(params.load(), DataParams)
    manifest, rejects, source = read(data)
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    meta = {"root": data.root, "task": data.task, "classes": data.classes if data.task == "classification" else None,
            "usable": len(manifest), "rejected": len(rejects), **source}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": json.dumps(meta).encode()})
    atomic_write(manifest_path, lambda f: pq.write_table(table, f))
    atomic_write(rejects_path, lambda f: f.write(rejects.to_csv(index=False).encode()))
    print(summary(manifest, rejects))
    for note in source["source"]["notes"]:
        print(note)
    if data.strict and len(rejects):
        first = rejects.iloc[0]
        raise UserError(f"strict mode: {len(rejects)} segment(s) rejected, first {first['id'] or first['path']}: "
                        f"{first['reason']} (see {rejects_path})")
    if len(manifest) == 0:
        raise UserError(f"no usable segments (see {rejects_path})")
    return 0


if __name__ == "__main__":
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("manifest", help="manifest Parquet to write")
    cli.add_argument("rejects", help="rejects CSV to write")
    args = cli.parse_args()
    sys.exit(guarded("prepare", main, args.manifest, args.rejects))
