"""Score new clips with a trained model: one clip, or many in one call with the model loaded once.

    python -m pipeline.predict CLIP.mp4 --text "what the speaker says" --model models/gce
    python -m pipeline.predict CLIP.mp4 --model models/gexsent               (no transcript: scored from the media)
    python -m pipeline.predict --text "a transcript alone" --model models/text_only
    python -m pipeline.predict clips/ --model models/gce --out scores.csv     (a folder; x.txt: x.mp4's transcript)
    python -m pipeline.predict "clips/*.mp4" --model models/gce --out scores.csv
    python -m pipeline.predict --list clips.csv --model models/gce --out scores.csv   (columns path, text[, id])
    python -m pipeline.predict CLIP.mp4 --text "..." --model models/gexsent --explain  (what moves the score)

Every clip goes through the same code as the corpus: `prepare` probes it, each feature stage the model
reads extracts its features with the encoder and params recorded in the checkpoint (sharing the feature
cache), and `schema.to_model_input` applies the training set's statistics, exactly as `assemble` did for
the training rows. Many clips run through each stage together and through the model in batches.

What a clip lacks is masked as missing, as `assemble` stores a segment whose extraction failed: no
transcript (text), no audio, no video stream. The model scores it from what is present and the output
notes it; a clip with none of the modalities the model reads (a clip without transcript for text_only)
gets an error instead of a score. Scores are clipped to the training corpus's label range and named
with its classes (`data.preset`); the output says what the names mean (`legend`). A clip whose
normalised features lie far outside the training data's gets a warning (`far_from_training`).
`--explain` leads with per-modality occlusion (the score with one modality missing), then the model's
internals, labelled for what they are (`interpret.explain`). docs/predict.md has the details.

Arguments, clips and the model file are checked before torch is imported: a missing file, a bad
argument or a cut-short model.pt is one line and exit code 2. Many clips: exit code 1 when some
clip could not be scored (its row says why), 0 when every clip was.
"""
from __future__ import annotations

import argparse
import csv
import glob
import importlib
import io
import os
import re
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError, guarded

# Far from the training data. The training statistics make every normalised training value
# z = (x - mean) / std; `schema.normalise` clips |z| at CLIP_SIGMAS (20). By Chebyshev, at most
# 1 / 20**2 = 0.25% of the training data's values per dimension lie that far out, and the mean of z**2
# over the training data is at most 1 (exactly 1 where the std was not floored). A clip with twice that
# share at the bound, or an RMS of 3 (9 times the training data's mean square), is unlike anything the
# model was fitted on: its score extrapolates. Measured (docs/predict.md): demo clips under a demo-trained
# model <= 0.13% and RMS <= 1.6; real talking-head clips 0.75-18% and RMS 3-9.5.
FAR_CLIPPED_SHARE = 0.005
FAR_RMS = 3.0
NO_TRANSCRIPT = "-"  # stands in for the transcript `prepare` requires; the text stage never sees it


class PredictError(UserError):
    """The clip or the model cannot be used; the message says why."""


@dataclass
class Clip:
    """One thing to score: a media file, a transcript, or both."""
    id: str
    path: Path | None    # None: a transcript alone
    text: str | None     # None: no transcript (text is masked as missing)
    error: str = ""      # why it cannot be scored (then it gets no score)


# --------------------------------------------------------------------------- what to score (no torch)

def gather(inputs: list[str], text: str | None = None, listing: str | None = None) -> list[Clip]:
    """Clips named on the command line (files, folders, globs; a folder's or glob's x.mp4 takes its
    transcript from x.txt beside it) and in a CSV list -> Clips. A named file that does not exist, a
    folder or glob without media, or --text for several clips: PredictError."""
    from ..data.media import AUDIO_EXTS, IMAGE_EXTS, VIDEO_EXTS

    media = VIDEO_EXTS + AUDIO_EXTS + IMAGE_EXTS
    if text is not None and not text.strip():
        raise PredictError("--text is empty: leave --text out to score a clip without its transcript")
    paths = []  # in the order given
    for arg in inputs:
        path = Path(arg)
        if path.is_file():
            if path.suffix.lower() == ".csv":
                raise PredictError(f"{path} is a CSV: give a list of clips as --list {path}")
            if path.suffix.lower() not in media:
                raise PredictError(f"{path} is not a media file (expected one of {' '.join(media)})")
            paths.append(path)
        elif path.is_dir() or glob.has_magic(arg):
            candidates = path.rglob("*") if path.is_dir() else map(Path, glob.glob(arg, recursive=True))
            clips = sorted((p for p in candidates if p.is_file() and p.suffix.lower() in media), key=_natural)
            if not clips:
                raise PredictError(f"no media files ({' '.join(media)}) {'in' if path.is_dir() else 'match'} {arg}")
            paths += clips
        else:
            raise PredictError(f"clip not found: {arg}")
    if text is not None and (len(paths) > 1 or listing):
        raise PredictError("--text is the transcript of one clip: give many clips theirs in the text column of "
                           "--list, or as x.txt beside x.mp4")
    clips = [Clip(p.stem, p, text if text is not None else _transcript_beside(p)) for p in paths]
    if listing:
        clips += read_list(listing, media)
    if not clips:
        if text is None:
            raise PredictError("nothing to score: give a clip, a folder, a glob, --list CLIPS.csv or --text")
        clips = [Clip("transcript", None, text.strip())]
    return _unique_ids(clips)


def _natural(path: Path) -> list:
    """Sort key: clip 2 before clip 10 (digit runs compare as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _transcript_beside(path: Path) -> str | None:
    side = path.with_suffix(".txt")
    if not side.is_file():
        return None
    return side.read_text(encoding="utf-8", errors="replace").strip() or None


def read_list(path: str | Path, media: tuple[str, ...]) -> list[Clip]:
    """A CSV of clips: `path` (relative to the CSV's folder; empty for a transcript alone) and/or `text`
    (empty: no transcript), optional `id`. A row whose clip is missing becomes an error row, not a stop."""
    path = Path(path)
    if not path.is_file():
        raise PredictError(f"list not found: {path}")
    try:
        reader = csv.DictReader(io.StringIO(path.read_text(encoding="utf-8-sig"), newline=""))
        rows, columns = list(reader), set(reader.fieldnames or ())
    except (UnicodeDecodeError, csv.Error) as err:
        raise PredictError(f"{path} is not a readable UTF-8 CSV ({err})") from None
    if not columns & {"path", "text"}:
        raise PredictError(f"{path} needs a `path` and/or a `text` column "
                           f"(it has {', '.join(sorted(columns)) or 'none'})")
    clips = []
    for row_number, row in enumerate(rows, 1):
        name, text = (row.get("path") or "").strip(), (row.get("text") or "").strip() or None
        clip_id = (row.get("id") or "").strip() or (Path(name).stem if name else f"row{row_number}")
        if not name:
            error = "" if text else f"row {row_number} has neither a clip path nor a transcript"
            clips.append(Clip(clip_id, None, text, error))
            continue
        clip = path.parent / name
        error = ("" if clip.is_file() and clip.suffix.lower() in media else
                 f"clip not found: {clip}" if not clip.is_file() else f"{clip} is not a media file")
        clips.append(Clip(clip_id, clip, text, error))
    if not clips:
        raise PredictError(f"{path} lists no clips")
    return clips


def _unique_ids(clips: list[Clip]) -> list[Clip]:
    """Ids as given; where two clips share one (x.mp4 in two folders), their paths tell them apart."""
    seen: dict[str, int] = {}
    for clip in clips:
        seen[clip.id] = seen.get(clip.id, 0) + 1
    for clip in clips:
        if seen[clip.id] > 1 and clip.path is not None:
            clip.id = str(clip.path)
    return clips


def model_file(model: str | Path) -> Path:
    """model.pt (or the folder holding it), checked without torch: there, and a complete archive in
    torch.save's zip format whose every member reads back with its checksum (a cut-short file has no
    central directory, a damaged one fails a CRC)."""
    path = Path(model)
    path = path / "model.pt" if path.is_dir() else path
    if not path.is_file():
        raise PredictError(f"no trained model at {path} (run `dvc repro` first)")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged, names = archive.testzip(), archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError) as err:
        raise PredictError(f"{path} is not a complete model file (cut short or damaged: {err}): restore it, "
                           f"or train again (`dvc repro`)") from None
    if damaged:
        raise PredictError(f"{path} is damaged ({damaged} fails its checksum): restore it, or train again "
                           f"(`dvc repro`)")
    if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
        raise PredictError(f"{path} is a zip archive but not a saved model (no data.pkl in it)")
    return path


# --------------------------------------------------------------------------- model and features

def load_model(path: Path):
    """(model in eval mode, checkpoint) from a checked model.pt; a file this code cannot rebuild: one line."""
    import pickle

    from ..training.train import load_checkpoint

    try:
        return load_checkpoint(path)
    except (RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise PredictError(f"{path} cannot be loaded as a model of this code ({reason}): train it again "
                           f"(`dvc repro`)") from None


def _cache_root() -> Path:
    """The feature cache of params.yaml here (so predict shares the stages' cache), else the default."""
    from .. import params
    from ..cache import CacheParams

    raw = params.load() if Path("params.yaml").is_file() else {}
    return params.read(raw, CacheParams).root()


def _check_encoder(m: str, trained: dict, now: dict, model: str) -> None:
    """The encoder must resolve to the weights the model was trained on (same id and revision)."""
    if (trained.get("id"), trained.get("revision")) != (now.get("id"), now.get("revision")):
        raise PredictError(
            f"the {m} encoder {trained.get('name') or trained.get('id')!r} now resolves to {now.get('id')} revision "
            f"{str(now.get('revision'))[:12]}, but {model} was trained on features from {trained.get('id')} revision "
            f"{str(trained.get('revision'))[:12]}: restore those weights, or re-run `dvc repro` to retrain")


def _manifest(keyed: list[tuple[str, Clip]], workdir: Path, progress: bool, with_media: bool = True):
    """A corpus in the MMSA layout around the clips (linked, not copied; one video_id per clip, its key)
    -> its manifest, segment ids '<key>/1'; a clip `prepare` rejects gets the reason as its error.
    Without media (a model that reads the transcript only), the clips are not even probed."""
    import pandas as pd

    from ..data.prepare import build_manifest

    parts = []
    for kind in ("media", "text"):  # a corpus without Raw/ is transcript-only: transcripts alone get their own
        chosen = [(key, c) for key, c in keyed if (c.path is not None and with_media) == (kind == "media")]
        if not chosen:
            continue
        corpus = workdir / kind
        corpus.mkdir()
        for key, clip in chosen:
            if kind == "media":
                (corpus / "Raw" / key).mkdir(parents=True)
                os.symlink(clip.path.resolve(), corpus / "Raw" / key / f"1{clip.path.suffix.lower()}")
        with open(corpus / "label.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([["video_id", "clip_id", "text", "label", "mode"]] +
                                    [[key, "1", c.text or NO_TRANSCRIPT, "0", "test"] for key, c in chosen])
        # the clips are linked from wherever the user keeps them: outside this corpus by design
        manifest, rejects = build_manifest({"root": str(corpus), "require_audio": False, "follow_links": True},
                                           progress=progress)
        reasons = dict(zip(rejects["id"], rejects["reason"]))
        for key, clip in chosen:
            if f"{key}/1" in reasons:
                what = clip.path.name if kind == "media" else "this transcript"
                clip.error = f"cannot use {what}: {reasons[key + '/1']}"
        parts.append(manifest)
    manifest = pd.concat(parts, ignore_index=True)
    manifest.loc[manifest["id"].isin([f"{key}/1" for key, c in keyed if c.text is None]), "text"] = ""
    return manifest


def clip_inputs(clips: list[Clip], ckpt: dict, cache_root=None,
                progress: bool = False) -> list[tuple[dict | None, list[str]]]:
    """Each clip -> (its model inputs as `schema.to_model_input` makes them, notes); (None, notes) for a
    clip that cannot be scored, whose `error` then says why. Each feature stage runs once for all clips."""
    from .. import params, schema
    from ..features.table import read_feature_table

    cfg, dims = ckpt["config"], ckpt["config"]["input_dims"]
    from_pickle = [m for m in dims if cfg["encoders"][m].get("source") == "pickle"]
    if from_pickle:
        raise PredictError(f"{cfg['name']} was trained on {', '.join(from_pickle)} features read from a feature "
                           f"pickle ({cfg['encoders'][from_pickle[0]]['name']}), which this pipeline cannot extract "
                           f"from a new clip: train on features the pipeline extracts (features.text.source: encoder "
                           f"for text)")
    norm = {k: v.numpy() for k, v in ckpt["norm"].items()}
    cache_root = cache_root or _cache_root()
    keyed = [(f"c{i:06d}", c) for i, c in enumerate(clips) if not c.error]
    segments: dict[str, dict] = {key: {} for key, _ in keyed}
    missing: dict[str, dict[str, str]] = {key: {} for key, _ in keyed}
    with tempfile.TemporaryDirectory() as tmp:
        with_media = not all(schema.get(m).from_transcript for m in dims)
        manifest = _manifest(keyed, Path(tmp), progress, with_media) if keyed else None
        keyed = [(key, c) for key, c in keyed if not c.error]  # prepare may have rejected some
        for m, dim in dims.items():
            modality = schema.get(m)
            rows = manifest[manifest["text"] != ""] if manifest is not None and modality.from_transcript else manifest
            table, failures = None, {}
            if rows is not None and len(rows):
                module = importlib.import_module(f"pipeline.features.{m}")
                stage_params = params.parse(params.SECTIONS[f"features.{m}"], cfg["feature_params"][m], f"features.{m}")
                meta = module.run(rows, stage_params, cache_root, Path(tmp) / f"{m}.parquet", show_progress=progress)
                table, _ = read_feature_table(Path(tmp) / f"{m}.parquet")
                failures = {f["id"]: f["reason"] for f in meta.get("failures", [])}
                if len(table):
                    _check_encoder(m, cfg["encoders"][m], meta["encoder"], cfg["name"])
            present = set(table.ids) if table is not None else set()
            for key, clip in keyed:
                sid = f"{key}/1"
                if sid in present:
                    pooled = table.get(sid, modality.pooled) if modality.pooled else None
                    segments[key].update(schema.to_model_input(modality, table.get(sid, modality.sequence), pooled,
                                                               int(cfg.get("max_steps", {}).get(m, 0)), norm))
                    if modality.token_ids:
                        segments[key][modality.batch_keys()["token_ids"]] = table.get(sid, modality.token_ids)
                else:
                    transcript = modality.from_transcript and clip.text is None
                    missing[key][m] = "no transcript" if transcript else failures.get(sid, "no features")
                    segments[key].update(missing_input(m, dim))
    keys = {id(c): key for key, c in keyed}
    return [_checked(c, segments.get(keys.get(id(c))), missing.get(keys.get(id(c)), {}), cfg) for c in clips]


def missing_input(m: str, dim: int) -> dict:
    """What the model sees for a modality a segment lacks, as `assemble` stores it: no steps, a zero pooled
    vector, no token ids."""
    import numpy as np

    from .. import schema

    modality, keys = schema.get(m), schema.get(m).batch_keys()
    out = {m: np.zeros((0, dim), schema.STORE_DTYPE)}
    if modality.pooled:
        out[keys["pooled"]] = np.zeros(dim, np.float32)
    if modality.token_ids:
        out[keys["token_ids"]] = np.zeros(0, np.int32)
    return out


def _checked(clip: Clip, segment: dict | None, missing: dict[str, str], cfg: dict) -> tuple[dict | None, list[str]]:
    """A clip's notes on what it lacks; its error when it lacks every modality the model reads."""
    from .. import schema

    dims = list(cfg["input_dims"])
    if clip.error or segment is None:
        return None, []
    if set(missing) == set(dims):
        if missing.get("text") == "no transcript" and len(dims) == 1:
            clip.error = (f"{cfg['name']} reads text only, and this clip has no transcript: give it one (--text, x.txt "
                          f"beside x.mp4, or the text column of --list)")
        else:
            clip.error = (f"nothing to score: {cfg['name']} reads {', '.join(dims)}, and this clip has none of them ("
                          + "; ".join(f"{m}: {r}" for m, r in missing.items()) + ")")
        return None, []
    present = [m for m in dims if m not in missing]
    notes = []
    if clip.path is None and len(missing):  # a transcript alone: one note, not one per media modality
        return segment, [f"a transcript alone: scored from {', '.join(present)} "
                         f"({', '.join(missing)} masked as missing)"]
    for m, reason in missing.items():
        if reason == "no transcript":
            notes.append(f"no transcript: scored from {', '.join(present)} (text masked as missing, as for a "
                         f"segment whose text failed)")
        else:
            notes.append(f"no {m} features ({reason}): predicting from the remaining modalities")
    if clip.path is not None and all(schema.get(m).from_transcript for m in dims):
        notes.append(f"{cfg['name']} reads {', '.join(dims)} only: the clip's media is unused")
    return segment, notes


def far_from_training(segment: dict, dims) -> list[str]:
    """Warnings for each modality whose normalised values lie far outside the training data's (the
    thresholds are argued at FAR_CLIPPED_SHARE above)."""
    import numpy as np

    from .. import schema

    warnings = []
    for m in dims:
        values = np.asarray(segment[m], np.float32)
        if not values.size:
            continue
        clipped = float(np.mean(np.abs(values) >= schema.CLIP_SIGMAS))
        rms = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
        if clipped > FAR_CLIPPED_SHARE or rms > FAR_RMS:
            warnings.append(f"{m} features far from the training data: {clipped:.1%} of values at the "
                            f"{schema.CLIP_SIGMAS:g}-sigma bound (training data: at most "
                            f"{1 / schema.CLIP_SIGMAS ** 2:.2%}), RMS {rms:.1f} sigma (training data: at most 1); "
                            f"the prediction extrapolates")
    return warnings


# --------------------------------------------------------------------------- scoring

def forward(model, ckpt: dict, segment: dict) -> dict:
    """The model's whole output for one segment (a batch of one): pred, aux, extras."""
    return forward_many(model, ckpt, [segment])


def forward_many(model, ckpt: dict, segments: list[dict]) -> dict:
    """The model's whole output for a batch of segments: pred (B,) or (B, C), aux, extras."""
    import torch

    from ..training.dataset import collate

    cfg = ckpt["config"]
    batch = collate(segments, cfg["input_dims"], with_token_ids=cfg["text_finetune"])
    with torch.no_grad():
        return model(batch)


def score(model, ckpt: dict, segment: dict):
    """The model's raw output for one segment's model inputs: a score, or class logits."""
    return forward(model, ckpt, segment)["pred"].float()[0]


def predictions(model, ckpt: dict, segments: list[dict], batch_size: int = 64, extras: bool = False):
    """Raw outputs (N,) or (N, C) for many segments, batch by batch; with extras, also each segment's
    extras as a batch of one (what `interpret.explain` reads)."""
    import torch

    preds, rows = [], []
    for start in range(0, len(segments), batch_size):
        out = forward_many(model, ckpt, segments[start:start + batch_size])
        preds.append(out["pred"].float())
        if extras:
            rows += [_row(out.get("extras", {}), i) for i in range(len(out["pred"]))]
    pred = torch.cat(preds) if preds else torch.zeros(0)
    return (pred, rows) if extras else pred


def _row(extras: dict, i: int) -> dict:
    """Sample i of a batch's per-sample extras, as a batch of one (batch sums, 'stats', are left out)."""
    import torch

    out = {}
    for key, value in extras.items():
        if isinstance(value, dict) and key != "stats":
            out[key] = _row(value, i)
        elif isinstance(value, torch.Tensor) and value.dim() > 0:
            out[key] = value[i:i + 1]
    return out


def describe(pred, cfg: dict) -> dict:
    """One raw output -> {score (clipped to the label range), label (in words), binary} or, for a
    classifier, {label, probabilities}; named by the training corpus's conventions (pipeline/presets.py)."""
    import numpy as np
    import torch

    from ..training.metrics import is_positive, score_classes
    from ..presets import DEFAULT

    if cfg["task"] == "classification":
        probs = torch.softmax(pred.float(), -1).numpy()
        return {"label": cfg["classes"][int(probs.argmax())],
                "probabilities": {c: float(p) for c, p in zip(cfg["classes"], probs)}}
    conventions = cfg.get("conventions") or DEFAULT
    value = float(np.clip(float(pred), *conventions["label_range"]))
    classes, names = score_classes([value], conventions["metrics"])
    return {"score": value, "label": names[int(classes[0])],
            "binary": "positive" if is_positive(value, conventions["metrics"]) else "negative"}


def occlusion(model, ckpt: dict, segments: list[dict], described: list[dict]) -> list[dict]:
    """Per segment, per modality the model reads: its output with that modality replaced by what the model
    sees when it is missing (`missing_input`), and the change from the full output. Regression:
    {score, change}; classification: {label, p (of the full input's label), change in p}; a modality the
    clip lacks already: {absent: True}."""
    cfg = ckpt["config"]
    variants, where = [], []
    for i, segment in enumerate(segments):
        for m, dim in cfg["input_dims"].items():
            if len(segment[m]):
                variants.append({**segment, **missing_input(m, dim)})
                where.append((i, m))
    out = [{m: {"absent": True} for m in cfg["input_dims"]} for _ in segments]
    for (i, m), pred in zip(where, predictions(model, ckpt, variants) if variants else []):
        without, full = describe(pred, cfg), described[i]
        if "score" in full:
            out[i][m] = {"score": without["score"], "change": without["score"] - full["score"]}
        else:
            p = without["probabilities"][full["label"]]
            out[i][m] = {"label": without["label"], "p": p, "change": p - full["probabilities"][full["label"]]}
    return out


def score_clips(model, ckpt: dict, clips: list[Clip], cache_root=None, explain: bool = False,
                progress: bool = False) -> list[dict]:
    """Score every clip with a loaded model -> one dict per clip: id, path, text, model, modalities, notes,
    warnings, error, and score/label/binary (or label/probabilities); with explain, also 'occlusion'
    (`occlusion`) and 'internals' (`interpret.explain`)."""
    cfg = ckpt["config"]
    inputs = clip_inputs(clips, ckpt, cache_root, progress)
    results = [{"id": c.id, "path": str(c.path or ""), "text": c.text or "", "model": cfg["name"], "modalities": [],
                "notes": notes, "warnings": [], "error": c.error} for c, (_, notes) in zip(clips, inputs)]
    scored = [i for i, (segment, _) in enumerate(inputs) if segment is not None]
    segments = [inputs[i][0] for i in scored]
    out = predictions(model, ckpt, segments, extras=explain)
    pred, extras = out if explain else (out, None)
    described = [describe(p, cfg) for p in pred]
    hidden = occlusion(model, ckpt, segments, described) if explain else None
    for k, i in enumerate(scored):
        results[i].update(described[k], modalities=[m for m in cfg["input_dims"] if len(segments[k][m])],
                          warnings=far_from_training(segments[k], cfg["input_dims"]))
        if explain:
            from ..training.interpret import explain as internals

            results[i].update(occlusion=hidden[k], internals=internals(cfg["name"], model, extras[k]))
    return results


def predict_clips(clips: list[Clip], model_dir, cache_root=None, explain: bool = False,
                  progress: bool = False) -> list[dict]:
    """Load the model once (model.pt or its folder) and score every clip (`score_clips`)."""
    model, ckpt = load_model(model_file(model_dir))
    return score_clips(model, ckpt, clips, cache_root, explain, progress)


def predict_clip(clip: str | Path | None, text: str | None, model_dir: str | Path, cache_root=None,
                 explain: bool = False) -> dict:
    """Score one clip (or, with clip None, one transcript; with text None, a clip without transcript) ->
    its result dict (`predict_clips`); a clip that cannot be scored raises PredictError."""
    clips = gather([str(clip)] if clip is not None else [], text)
    result = predict_clips(clips, model_dir, cache_root, explain)[0]
    if result["error"]:
        raise PredictError(result["error"])
    return result


def model_inputs(clip: str | Path | None, text: str | None, ckpt: dict, cache_root=None) -> tuple[dict, list[str]]:
    """One clip (or None) and its transcript -> (the model inputs of `schema.to_model_input`, notes)."""
    clips = gather([str(clip)] if clip is not None else [], text)
    (segment, notes), = clip_inputs(clips, ckpt, cache_root)
    if clips[0].error:
        raise PredictError(clips[0].error)
    return segment, notes


# --------------------------------------------------------------------------- output

def legend(cfg: dict) -> list[str]:
    """What the output's names mean, for the model's task and training corpus (pipeline/presets.py)."""
    from ..presets import DEFAULT

    if cfg["task"] == "classification":
        return [f"label: the most probable of the classes the model was trained on ({', '.join(cfg['classes'])}); "
                f"p_<class>: the softmax probability of each"]
    conventions = cfg.get("conventions") or DEFAULT
    lo, hi = conventions["label_range"]
    lines = [f"score: sentiment on the training corpus's scale, {lo:+g} (negative) to {hi:+g} (positive), "
             f"clipped to it (data.preset {conventions.get('preset', 'mosi')})"]
    if conventions["metrics"] == "sims":
        return lines + ["label: CH-SIMS's 5 bins: negative <= -0.7 < weakly negative <= -0.1 < neutral <= 0.1 < "
                        "weakly positive <= 0.7 < positive",
                        "binary: positive when score > 0; CH-SIMS's Acc-2 counts 0 as negative"]
    return lines + ["label: the score rounded to a whole number within [-3, 3], the 7 classes of Acc-7: -3 strongly "
                    "negative, -2 negative, -1 weakly negative, 0 neutral, +1 weakly positive, +2 positive, "
                    "+3 strongly positive",
                    "binary: positive when score >= 0, MOSI's has0 convention (Acc-2 has0 counts 0 as positive; "
                    "Acc-2 non0 leaves 0-labelled clips out): +0.4 is neutral in 7 classes yet binary positive"]


def explain_lines(result: dict) -> list[str]:
    """--explain for one clip: the occlusion first (what moves the score), then the labelled internals
    (`interpret.explain`: a header line, then its items, indented here)."""
    what = "score" if "score" in result else "prediction"
    lines = [f"what moves the {what} (each modality replaced by what the model sees when it is missing):"]
    width = max(map(len, result["occlusion"]))
    for m, o in result["occlusion"].items():
        if o.get("absent"):
            lines.append(f"  without {m:<{width}}  absent from this clip already")
        elif "score" in o:
            lines.append(f"  without {m:<{width}}  score {o['score']:+.3f}  (change {o['change']:+.3f})")
        else:
            lines.append(f"  without {m:<{width}}  label {o['label']}  (p({result['label']}) {o['p']:.3f}, "
                         f"change {o['change']:+.3f})")
    header, *items = result["internals"]
    return lines + [header] + [f"  {line}" for line in items]


def print_result(result: dict, meaning: list[str]) -> None:
    for note in result["notes"]:
        print(f"note: {note}")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    source = f"[{result['model']}, from {', '.join(result['modalities'])}]"
    if "score" in result:
        print(f"score {result['score']:+.3f}  ({result['label']}; binary {result['binary']})  {source}")
    else:
        shares = ", ".join(f"{c} {p:.3f}" for c, p in result["probabilities"].items())
        print(f"label {result['label']}  ({shares})  {source}")
    for line in (explain_lines(result) if "occlusion" in result else []) + ["meaning:"]:
        print(line)
    for line in meaning:
        print(f"  {line}")


def write_csv(results: list[dict], out) -> None:
    """One row per clip: id, path, text, model, score, label, binary (classification: label, p_<class>),
    modalities, notes, warnings, error; with --explain, without_<m> and change_<m> per modality, internals."""
    columns = ["id", "path", "text", "model"]
    scored = [r for r in results if not r["error"]]
    first = scored[0] if scored else {}
    if "probabilities" in first:
        columns += ["label", *(f"p_{c}" for c in first["probabilities"])]
    else:
        columns += ["score", "label", "binary"]
    columns += ["modalities", "notes", "warnings", "error"]
    for m in first.get("occlusion", {}):
        columns += [f"without_{m}", f"change_{m}"]
    columns += ["internals"] if "internals" in first else []
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in results:
        row = {**r, "modalities": " ".join(r["modalities"]), "notes": " | ".join(r["notes"]),
               "warnings": " | ".join(r["warnings"]), "internals": " | ".join(r.get("internals", []))}
        if "score" in r:
            row["score"] = f"{r['score']:.4f}"
        row.update({f"p_{c}": f"{p:.4f}" for c, p in r.get("probabilities", {}).items()})
        for m, o in r.get("occlusion", {}).items():
            if not o.get("absent"):
                row[f"without_{m}"] = f"{o['score']:.4f}" if "score" in o else o["label"]
                row[f"change_{m}"] = f"{o['change']:.4f}"
        writer.writerow(row)


# --------------------------------------------------------------------------- command line

class _Arguments(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (through `guarded`), not argparse's usage block
        raise PredictError(f"{message} (see --help)")


def _parser() -> argparse.ArgumentParser:
    cli = _Arguments(prog="python -m pipeline.predict", description=__doc__.split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    cli.add_argument("clips", nargs="*", help="clips (video, audio file or image), folders of clips, or globs; "
                                              "omit for a transcript alone (--text)")
    cli.add_argument("--text", help="the transcript of the one clip (omit it: the clip is scored without text)")
    cli.add_argument("--list", metavar="CSV", help="a CSV of clips: path (relative to the CSV's folder), text, "
                                                    "optional id; an empty text means no transcript")
    cli.add_argument("--model", default="models/gce", help="trained model folder or model.pt (default models/gce)")
    cli.add_argument("--out", help="write the CSV here (many clips: default stdout)")
    cli.add_argument("--explain", action="store_true",
                     help="what moves the score (per-modality occlusion), then the model's internals, labelled")
    return cli


def _main(argv) -> int:
    args = _parser().parse_args(argv)
    clips = gather(args.clips, args.text, args.list)
    path = model_file(args.model)
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise PredictError(f"cannot write {args.out}: its folder does not exist")
    # a table for a list, a folder or a glob however many clips they hold, and wherever --out asks for one
    many = len(clips) > 1 or bool(args.out or args.list) or any(not Path(arg).is_file() for arg in args.clips)
    model, ckpt = load_model(path)  # the first heavy step: everything above fails fast
    results = score_clips(model, ckpt, clips, explain=args.explain, progress=many)
    cfg = ckpt["config"]
    if not many:
        if results[0]["error"]:
            raise PredictError(results[0]["error"])
        print_result(results[0], legend(cfg))
        return 0
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as f:
            write_csv(results, f)
    else:
        write_csv(results, sys.stdout)
    failed = [r for r in results if r["error"]]
    print(f"predict: scored {len(results) - len(failed)} of {len(results)} clips with {cfg['name']}"
          + (f" -> {args.out}" if args.out else "")
          + (f"; {len(failed)} not scored (see the error column)" if failed else ""), file=sys.stderr)
    for line in legend(cfg):
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    return guarded("predict", _main, argv)

