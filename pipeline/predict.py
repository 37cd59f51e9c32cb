"""Predict the sentiment of one new clip with a trained model.

    python -m pipeline.predict CLIP.mp4 --text "what the speaker says" --model models/gce

The clip goes through the same code as the corpus: `prepare` probes it, the text,
visual and acoustic stages extract its features with the encoders and params recorded
in the checkpoint (sharing the feature cache), the training set's normalisation is
applied, and the model scores it. A clip without usable audio is scored from the
remaining modalities, and the output says so.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from .config import cache_dir
from .dataset import CLIP_SIGMAS, SEQUENCE_COLUMN, read_feature_meta, shrink_sequence
from .metrics import SEVEN_CLASS_NAMES, seven_class
from .prepare import build_manifest


class PredictError(Exception):
    """The clip or the model cannot be used; the message says why."""


def _extractors():
    from .features import acoustic, text, visual
    return {"text": text.run, "visual": visual.run, "acoustic": acoustic.run}


def _features_for(manifest, ckpt: dict, workdir: Path, cache_root) -> tuple[dict, list[str]]:
    """Run the feature stages on a one-row manifest -> (model batch, notes)."""
    cfg = ckpt["config"]
    norm = {k: v.numpy() for k, v in ckpt["norm"].items()}
    notes, batch = [], {}
    for m in cfg["input_dims"]:
        params = {"features": {m: cfg["feature_params"][m]}, "compute": {"backend": "local", "n_jobs": 1}}
        out = workdir / f"{m}.parquet"
        _extractors()[m](manifest, params, cache_root, out, show_progress=False)
        table = pq.read_table(out)
        dim = cfg["input_dims"][m]
        if table.num_rows == 0:
            failures = read_feature_meta(out).get("failures") or [{"reason": "no features"}]
            notes.append(f"no {m} features ({failures[0]['reason']}): predicting from the remaining modalities")
            batch[m] = torch.zeros(1, 1, dim)
            batch[f"{m}_mask"] = torch.zeros(1, 1, dtype=torch.bool)
            if m == "text":
                batch["text_pooled"] = torch.zeros(1, dim)
            continue
        seq = table.column(SEQUENCE_COLUMN[m])[0].values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
        seq = shrink_sequence(seq, int(cfg.get("max_steps", {}).get(m, 0)))
        seq = np.clip((seq - norm[f"{m}_mean"]) / norm[f"{m}_std"], -CLIP_SIGMAS, CLIP_SIGMAS)
        batch[m] = torch.from_numpy(seq.astype(np.float16).astype(np.float32))[None]
        batch[f"{m}_mask"] = torch.ones(1, len(seq), dtype=torch.bool)
        if m == "text":
            pooled = table.column("pooled_mean")[0].values.to_numpy(zero_copy_only=False).astype(np.float32)
            pooled = np.clip((pooled - norm["text_pooled_mean"]) / norm["text_pooled_std"], -CLIP_SIGMAS, CLIP_SIGMAS)
            batch["text_pooled"] = torch.from_numpy(pooled.astype(np.float32))[None]
            ids = table.column("token_ids")[0].values.to_numpy(zero_copy_only=False).astype(np.int64)
            batch["token_ids"] = torch.from_numpy(ids)[None]
            batch["token_mask"] = torch.ones(1, len(ids), dtype=torch.bool)
    return batch, notes


def predict_clip(clip: str | Path | None, text: str, model_dir: str | Path, cache_root=None) -> dict:
    """Score one clip (or, with clip None, one transcript) -> dict with score/labels and notes."""
    from .train import load_checkpoint

    model_path = Path(model_dir) / "model.pt" if Path(model_dir).is_dir() else Path(model_dir)
    if not model_path.is_file():
        raise PredictError(f"no trained model at {model_path} (run `dvc repro` first)")
    model, ckpt = load_checkpoint(model_path)
    cfg = ckpt["config"]
    cache_root = cache_root or cache_dir({})
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        if clip is not None:
            clip = Path(clip)
            if not clip.is_file():
                raise PredictError(f"clip not found: {clip}")
            (corpus / "Raw" / "clip").mkdir(parents=True)
            os.symlink(clip.resolve(), corpus / "Raw" / "clip" / f"1{clip.suffix.lower()}")
        with open(corpus / "label.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["video_id", "clip_id", "text", "label", "mode"], ["clip", "1", text, "0", "test"]])
        manifest, rejects = build_manifest({"root": str(corpus), "require_audio": False}, progress=False)
        if len(rejects):
            raise PredictError(f"cannot use this input: {rejects['reason'].iloc[0]}")
        notes = []
        if clip is not None and not manifest["has_audio"].iloc[0] and "acoustic" in cfg["input_dims"]:
            notes.append("the clip has no usable audio (no track, or silent): predicting from the remaining modalities")
            manifest = manifest.assign(has_audio=False)
        batch, feature_notes = _features_for(manifest, ckpt, Path(tmp), cache_root)
    notes += [n for n in feature_notes if not (n.startswith("no acoustic") and notes)]
    if not cfg["text_finetune"]:
        batch.pop("token_ids", None), batch.pop("token_mask", None)
    with torch.no_grad():
        pred = model(batch)["pred"].float()[0]
    result = {"model": cfg["name"], "modalities": [m for m in cfg["input_dims"] if batch[f"{m}_mask"].any()], "notes": notes}
    if cfg["task"] == "classification":
        probs = torch.softmax(pred, -1).numpy()
        result.update(label=cfg["classes"][int(probs.argmax())], probabilities=dict(zip(cfg["classes"], probs.round(4).tolist())))
    else:
        score = float(np.clip(pred.item(), -3, 3))
        result.update(score=score, seven_class=SEVEN_CLASS_NAMES[int(seven_class(score)) + 3],
                      binary="positive" if score >= 0 else "negative")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("clip", nargs="?", help="video clip (mp4, ...) or image; omit for text alone")
    parser.add_argument("--text", required=True, help="the transcript of the clip")
    parser.add_argument("--model", default="models/gce", help="trained model folder (default models/gce)")
    args = parser.parse_args(argv)
    try:
        result = predict_clip(args.clip, args.text, args.model)
    except PredictError as err:
        print(f"predict: {err}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}")
    if "score" in result:
        print(f"score {result['score']:+.3f}  ({result['seven_class']}; binary {result['binary']})"
              f"  [{result['model']}, from {', '.join(result['modalities'])}]")
    else:
        print(f"label {result['label']}  {result['probabilities']}  [{result['model']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
