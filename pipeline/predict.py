"""Predict the sentiment of one new clip with a trained model.

    python -m pipeline.predict CLIP.mp4 --text "what the speaker says" --model models/gce
    python -m pipeline.predict --text "a transcript alone" --model models/text_only
    python -m pipeline.predict CLIP.mp4 --text "..." --model models/gexsent --explain   (+ what the model saw)

The clip goes through the same code as the corpus: `prepare` probes it, each feature stage the
model reads extracts its features with the encoder and params recorded in the checkpoint (sharing
the feature cache), and `schema.to_model_input` applies the training set's statistics, exactly as
`assemble` did for the training rows. An encoder that now resolves to other weights than the
ones the model was trained on is refused. What the clip lacks (no audio, no video stream) is
masked and the model scores it from what is present; the output says so. Scores are clipped to
the training corpus's label range and named with its classes (`data.preset`: MOSI's 7, CH-SIMS's 5);
a model trained on features read from a feature pickle is refused (they cannot be extracted here).
"""
from __future__ import annotations

import argparse
import csv
import importlib
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import params, schema
from .errors import UserError, guarded


class PredictError(UserError):
    """The clip or the model cannot be used; the message says why."""


def _cache_root() -> Path:
    """The feature cache of params.yaml here (so predict shares the stages' cache), else the default."""
    from .cache import CacheParams

    raw = params.load() if Path("params.yaml").is_file() else {}
    return params.read(raw, CacheParams).root()


def _one_row_manifest(clip: Path | None, text: str, workdir: Path):
    """A one-segment corpus in the MMSA layout around the clip (linked, not copied) -> its manifest."""
    from .media import AUDIO_EXTS
    from .prepare import build_manifest

    corpus = workdir / "corpus"
    corpus.mkdir()
    if clip is not None:
        (corpus / "Raw" / "clip").mkdir(parents=True)
        os.symlink(clip.resolve(), corpus / "Raw" / "clip" / f"1{clip.suffix.lower()}")
    with open(corpus / "label.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([["video_id", "clip_id", "text", "label", "mode"], ["clip", "1", text, "0", "test"]])
    # the clip is linked from wherever the user keeps it: outside this one-clip corpus by design
    manifest, rejects = build_manifest({"root": str(corpus), "require_audio": False, "follow_links": True},
                                       progress=False)
    if len(rejects):
        kind = "audio file" if clip is not None and clip.suffix.lower() in AUDIO_EXTS else "input"
        raise PredictError(f"cannot use this {kind}: {rejects['reason'].iloc[0]}")
    return manifest


def _check_encoder(m: str, trained: dict, now: dict, model: str) -> None:
    """The encoder must resolve to the weights the model was trained on (same id and revision)."""
    if (trained.get("id"), trained.get("revision")) != (now.get("id"), now.get("revision")):
        raise PredictError(
            f"the {m} encoder {trained.get('name') or trained.get('id')!r} now resolves to {now.get('id')} revision "
            f"{str(now.get('revision'))[:12]}, but {model} was trained on features from {trained.get('id')} revision "
            f"{str(trained.get('revision'))[:12]}: restore those weights, or re-run `dvc repro` to retrain")


def model_inputs(clip: str | Path | None, text: str, ckpt: dict, cache_root=None) -> tuple[dict, list[str]]:
    """One clip (or None) and its transcript -> (the model inputs of `schema.to_model_input`, notes)."""
    from .features.table import read_feature_table

    cfg = ckpt["config"]
    norm = {k: v.numpy() for k, v in ckpt["norm"].items()}
    cache_root = cache_root or _cache_root()
    clip = Path(clip) if clip is not None else None
    if clip is not None and not clip.is_file():
        raise PredictError(f"clip not found: {clip}")
    segment, notes = {}, []
    from_pickle = [m for m in cfg["input_dims"] if cfg["encoders"][m].get("source") == "pickle"]
    if from_pickle:
        raise PredictError(f"{cfg['name']} was trained on {', '.join(from_pickle)} features read from a feature pickle "
                           f"({cfg['encoders'][from_pickle[0]]['name']}), which this pipeline cannot extract from a new clip: "
                           f"train on features the pipeline extracts (features.text.source: encoder for text)")
    with tempfile.TemporaryDirectory() as tmp:
        manifest = _one_row_manifest(clip, text, Path(tmp))
        for m, dim in cfg["input_dims"].items():
            modality, module = schema.get(m), importlib.import_module(f"pipeline.features.{m}")
            stage_params = params.parse(params.SECTIONS[f"features.{m}"], cfg["feature_params"][m], f"features.{m}")
            out = Path(tmp) / f"{m}.parquet"
            meta = module.run(manifest, stage_params, cache_root, out, show_progress=False)
            table, _ = read_feature_table(out)
            if len(table) == 0:
                reason = (meta.get("failures") or [{"reason": "no features"}])[0]["reason"]
                notes.append(f"no {m} features ({reason}): predicting from the remaining modalities")
                segment[m] = np.zeros((0, dim), schema.STORE_DTYPE)
                if modality.pooled:
                    segment[f"{m}_pooled"] = np.zeros(dim, np.float32)
                continue
            _check_encoder(m, cfg["encoders"][m], meta["encoder"], cfg["name"])
            id_ = table.ids[0]
            pooled = table.get(id_, modality.pooled) if modality.pooled else None
            segment.update(schema.to_model_input(modality, table.get(id_, modality.sequence), pooled,
                                                 int(cfg.get("max_steps", {}).get(m, 0)), norm))
            if modality.token_ids:
                segment[modality.batch_keys()["token_ids"]] = table.get(id_, modality.token_ids)
    if clip is not None and all(schema.get(m).from_transcript for m in cfg["input_dims"]):
        notes.append(f"{cfg['name']} reads {', '.join(cfg['input_dims'])} only: the clip's media is unused")
    return segment, notes


def score(model: torch.nn.Module, ckpt: dict, segment: dict) -> torch.Tensor:
    """The model's raw output for one segment's model inputs: a score, or class logits."""
    return forward(model, ckpt, segment)["pred"].float()[0]


def forward(model: torch.nn.Module, ckpt: dict, segment: dict) -> dict:
    """The model's whole output for one segment (a batch of one): pred, aux, extras."""
    from .dataset import collate

    cfg = ckpt["config"]
    batch = collate([segment], cfg["input_dims"], with_token_ids=cfg["text_finetune"])
    with torch.no_grad():
        return model(batch)


def predict_clip(clip: str | Path | None, text: str, model_dir: str | Path, cache_root=None, explain: bool = False) -> dict:
    """Score one clip (or, with clip None, one transcript) -> dict with score/label, modalities used and notes;
    with explain, also 'explain': lines on what the model saw (`interpret.explain`)."""
    from .metrics import is_positive, score_classes
    from .presets import DEFAULT
    from .train import load_checkpoint

    model_path = Path(model_dir) / "model.pt" if Path(model_dir).is_dir() else Path(model_dir)
    if not model_path.is_file():
        raise PredictError(f"no trained model at {model_path} (run `dvc repro` first)")
    model, ckpt = load_checkpoint(model_path)
    cfg = ckpt["config"]
    segment, notes = model_inputs(clip, text, ckpt, cache_root)
    out = forward(model, ckpt, segment)
    pred = out["pred"].float()[0]
    result = {"model": cfg["name"], "modalities": [m for m in cfg["input_dims"] if len(segment[m])], "notes": notes}
    if explain:
        from .interpret import explain as explain_lines

        result["explain"] = explain_lines(cfg["name"], model, out.get("extras", {}))
    if cfg["task"] == "classification":
        probs = torch.softmax(pred, -1).numpy()
        result.update(label=cfg["classes"][int(probs.argmax())],
                      probabilities={c: round(float(p), 3) for c, p in zip(cfg["classes"], probs)})
    else:
        conventions = cfg.get("conventions") or DEFAULT  # label range and class names of the training corpus
        score_ = float(np.clip(pred.item(), *conventions["label_range"]))
        classes, names = score_classes([score_], conventions["metrics"])
        result.update(score=score_, score_class=names[int(classes[0])],
                      binary="positive" if is_positive(score_, conventions["metrics"]) else "negative")
    return result


def _print(result: dict) -> None:
    for note in result["notes"]:
        print(f"note: {note}")
    source = f"[{result['model']}, from {', '.join(result['modalities'])}]"
    if "score" in result:
        print(f"score {result['score']:+.3f}  ({result['score_class']}; binary {result['binary']})  {source}")
    else:
        shares = ", ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items())
        print(f"label {result['label']}  ({shares})  {source}")
    for line in result.get("explain", []):
        print(f"  {line}")


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0])
    cli.add_argument("clip", nargs="?", help="video clip (mp4, ...), audio file or image; omit for text alone")
    cli.add_argument("--text", required=True, help="the transcript of the clip")
    cli.add_argument("--model", default="models/gce", help="trained model folder or model.pt (default models/gce)")
    cli.add_argument("--explain", action="store_true",
                     help="also print what the model saw: modality shares and top experts (GEXSent), the pair "
                          "graders and the most trusted guide pair (GCE)")
    args = cli.parse_args(argv)
    return guarded("predict", lambda: _print(predict_clip(args.clip, args.text, args.model, explain=args.explain)))


if __name__ == "__main__":
    sys.exit(main())
