"""A feature stage's table read from the data source's own features (an MMSA or MulT/CMU pickle).

`pickle_stage` is the one hook (called by `runner.stage_main`): when the manifest came from a pickle
(`data.format: mmsa`), it returns a run function with the extractors' signature that writes
features/<stage>.parquet from the pickle's array for that modality, with the columns the registry
declares (token ids from text_bert's mask, the pooled vector as the mean of the steps), streamed a
block of rows at a time; -inf and other non-finite values are set to 0 as `prepare` counted them.
`features.text.source: encoder` instead sends the transcripts through the text extractor.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import schema
from ..data.mmsa import LAYOUTS, MODALITY_KEYS, PickleError, block_slices, clean, open_pickle, read_rows, steps_of


def pickle_stage(stage: str, manifest_path, cfg):
    """The feature stage's run function when its modality comes from the pickle, else None (extract as usual).
    Same signature as the extractor modules' `run`."""
    manifest_meta = schema.read_meta(manifest_path)
    source = manifest_meta.get("source") or {}
    if source.get("format") != "mmsa" or stage not in MODALITY_KEYS:
        return None  # a raw corpus: media and transcripts go through the extractors
    if getattr(cfg, "source", "pickle") == "encoder":
        if not LAYOUTS[source["layout"]].has_text:
            raise PickleError("features.text.source is encoder, but a MulT/CMU pickle holds no transcripts (raw_text)")
        return None

    def run(manifest, cfg, cache_root, out_path, *, compute=None, show_progress=False):
        return write_table(stage, manifest, manifest_meta, cfg, out_path)
    return run


def _check_unchanged(source: dict) -> None:
    from ..cache import file_sha256

    path = Path(source["pickle"])
    if not path.is_file():
        raise PickleError(f"{path} (the manifest's source) does not exist any more: run `dvc repro prepare`")
    stat = path.stat()
    if (stat.st_size, stat.st_mtime_ns) != (source["size"], source["mtime_ns"]) and file_sha256(path) != source["sha256"]:
        raise PickleError(f"{path} changed since `prepare` read it: run `dvc repro prepare` (or `dvc repro`)")


def write_table(stage: str, manifest: pd.DataFrame, manifest_meta: dict, cfg, out_path) -> dict:
    """features/<stage>.parquet from the pickle's array for this modality, streamed in row groups."""
    import pyarrow as pa

    from ..params import as_dict
    from .table import list_array, write_feature_batches

    t0, source = time.perf_counter(), manifest_meta["source"]
    _check_unchanged(source)
    m, key = schema.get(stage), MODALITY_KEYS[stage]
    layout, splits = open_pickle(source["pickle"], manifest_meta["conventions"])
    present = splits["train"].array(stage) is not None
    fields = [("id", pa.string()), (m.length, pa.int32()), (m.sequence, pa.list_(pa.float32()))]
    fields += [(m.pooled, pa.list_(pa.float32()))] if m.pooled else []
    fields += [(m.token_ids, pa.list_(pa.int32()))] if m.token_ids else []
    arrow_schema = pa.schema(fields)
    by_split = {s: manifest[manifest["split"] == s] for s in splits}
    failures = [{"id": id_, "reason": f"no {key} steps (length 0 in the pickle)"}
                for s, rows in by_split.items() if present
                for id_, n in zip(rows["id"], splits[s].lengths(stage)[rows["pickle_row"].to_numpy(np.int64)]) if n == 0]
    if not present:  # as for a raw corpus without media: every segment skipped, with the reason
        failures = [{"id": id_, "reason": f"the pickle holds no {MODALITY_KEYS[stage]}", "skipped": True}
                    for id_ in manifest["id"]]
    ok = len(manifest) - len(failures)

    def batches():
        for s, mine in by_split.items() if present else []:  # a modality the pickle lacks: no rows
            rows, ids = mine["pickle_row"].to_numpy(np.int64), mine["id"].tolist()
            split = splits[s]
            array, lengths = split.array(stage), split.lengths(stage)
            tokens = split.values.get("text_bert") if m.token_ids else None
            for a, b in block_slices(rows, array):
                block = clean(read_rows(array, rows[a:b]), lengths[rows[a:b]], layout.pad_front)["block"]
                token_block = read_rows(tokens, rows[a:b]) if tokens is not None else None
                keep = [j for j in range(b - a) if lengths[rows[a + j]] > 0]
                steps = [steps_of(block[j], int(lengths[rows[a + j]]), layout.pad_front) for j in keep]
                columns = [pa.array([ids[a + j] for j in keep], pa.string()), pa.array([len(x) for x in steps], pa.int32()),
                           list_array(steps, np.float32)]
                if m.pooled:
                    columns.append(list_array([x.mean(0, dtype=np.float64).astype(np.float32) for x in steps], np.float32))
                if m.token_ids:  # the ids under the text_bert mask; none where the pickle has no text_bert
                    columns.append(list_array([token_block[j, 0][token_block[j, 1] > 0].astype(np.int32)
                                               if token_block is not None else np.zeros(0, np.int32) for j in keep], np.int32))
                yield pa.RecordBatch.from_arrays(columns, schema=arrow_schema)
        if not present or manifest.empty:  # the table still gets its schema and report
            yield pa.RecordBatch.from_arrays([pa.array([], f.type) for f in arrow_schema], schema=arrow_schema)

    meta = {"stage": stage, "dim": int(splits["train"].array(stage).shape[2]) if present else 0, "params": as_dict(cfg),
            "encoder": {"id": f"pickle:{layout.name}:{key}", "name": f"{key} features of {Path(source['pickle']).name}",
                        "revision": source["sha256"], "source": "pickle"},
            "source": {"pickle": source["pickle"], "key": key, "layout": layout.name,
                       "token_ids": "text_bert" if m.token_ids and "text_bert" in splits["train"].values else None},
            "values_set_to_0": (source.get("values_set_to_0") or {}).get(stage, {}),
            "counts": {"segments": len(manifest), "ok": ok, "failed": len(failures) if present else 0, "cached": 0,
                       "extracted": ok, "skipped": 0 if present else len(failures), "repaired": 0},
            "failures": failures, "notes": [], "retries": [], "repaired": []}
    if not present:
        meta["note"] = f"the pickle holds no {key}"
    write_feature_batches(out_path, arrow_schema, batches(), meta)
    wall = round(time.perf_counter() - t0, 3)  # for the stage's summary line; the table's report has no timing
    return {**meta, "wall_s": wall, "throughput": {"extract_s": wall, "note": "read from the pickle"}}
