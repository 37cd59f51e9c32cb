"""Stage `prepare`: raw corpus -> features/manifest.parquet + features/rejects.csv.

    python -m stages.prepare            (what `dvc repro prepare` runs)

Reads params `data.*`. Every label row and media file is either a manifest row
or a line in rejects.csv with its reason; `data.strict: true` makes any reject
fail the stage.
"""
import json
import os
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import load_params
from pipeline.prepare import PrepareError, build_manifest, summary

OUT = Path("features")


def main() -> int:
    data = load_params()["data"]
    try:
        manifest, rejects = build_manifest(data)
    except PrepareError as err:
        print(f"prepare: {err}", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    table = pa.Table.from_pandas(manifest, preserve_index=False)
    meta = {"root": str(data["root"]), "task": data.get("task", "regression"),
            "classes": data.get("classes") if data.get("task") == "classification" else None,
            "usable": len(manifest), "rejected": len(rejects)}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"pipeline": json.dumps(meta).encode()})
    pq.write_table(table, OUT / "manifest.parquet.tmp")
    os.replace(OUT / "manifest.parquet.tmp", OUT / "manifest.parquet")
    rejects.to_csv(OUT / "rejects.csv.tmp", index=False)
    os.replace(OUT / "rejects.csv.tmp", OUT / "rejects.csv")
    print(summary(manifest, rejects))
    if data.get("strict") and len(rejects):
        first = rejects.iloc[0]
        print(f"prepare: strict mode: {len(rejects)} segment(s) rejected, first {first['id'] or first['path']}: "
              f"{first['reason']} (see features/rejects.csv)", file=sys.stderr)
        return 1
    if len(manifest) == 0:
        print("prepare: no usable segments (see features/rejects.csv)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
