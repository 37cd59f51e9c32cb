"""Robustness at test time, without retraining: trained models scored on corrupted test inputs.

Protocols (`random`, `block` and `subsets` follow the field's conventions, so those numbers compare with
papers; `noise` is this project's own):

* `random` — per-step random drop at rate r (LNLN, TFR-Net, OpenVNA `feat_random_drop`): each step
  of each targeted modality is dropped with probability r. A dropped text token becomes the
  tokenizer's unknown token, special tokens ([CLS], [SEP], ...) are kept, and the transcript is
  re-encoded with the dataset's own text encoder (stored token states are frozen encoder outputs:
  dropping a token changes every state). A model that fine-tunes the encoder gets the ids
  directly. Text read from a feature pickle (no encoder to re-run) drops its steps as the other
  modalities do. A dropped visual/acoustic step becomes a zero feature vector before normalisation, i.e.
  `to_model_input` of zeros, clip(-mean / std) — what the papers' zero padding is to a model fed
  normalised features.
* `block` — structural drop (OpenVNA `feat_structural_drop`, MultiBench): one contiguous block of
  round(r * n) steps at a uniformly drawn start, replaced as above.
* `subsets` — whole modalities missing: every non-empty proper subset of the dataset's modalities
  (the six "each modality or pair missing" cases for three), exactly the training-time masking.
* `noise` — this project's own protocol, not a published one: additive Gaussian noise on the
  normalised model inputs at a signal-to-noise ratio in dB, per segment and modality:
  sigma = rms(x) * 10^(-snr/20), then clipped as `to_model_input` clips.

A segment whose every droppable step of a modality is dropped has lost that modality: it becomes
missing (no steps, mask all False, pooled vector zero), as `assemble` stores a failed extraction.
So r = 1 equals training-time masking of the targeted modalities, and r = 0 changes nothing: the
curve starts at the plain test metric (tests/test_evaluation.py checks both).

Each rate is averaged over the mask seeds (>= 3); per curve the summary holds the mean over levels
and the area under the metric-vs-rate curve divided by the rate span (trapezoid; `evaluation.auc`).
The default rates are LNLN's, 0..0.9 step 0.1; adding 1.0 (`robustness.rates`) adds the point where
the targeted modalities are gone, and the report labels the AUC with the range it covers.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import schema
from ..training.dataset import AssembledData, collate
from .stats import auc
from .stats import summarize as over_seeds
from ..training.metrics import classification_metrics, regression_metrics
from ..params import between, ge, param, section

RATES = [round(0.1 * i, 1) for i in range(10)]  # 0..0.9, as LNLN; 1.0 (modality gone) only when asked
CACHE_ENTRIES = 20_000  # re-encoded transcripts kept (MOSI-sized: ~ 250 MB at most)


@section("robustness")
@dataclass
class RobustnessParams:
    rates: list[float] = param(RATES, between(0, 1), "drop rates of the random and block protocols (1.0: the "
                                                      "targeted modalities gone; LNLN stops at 0.9)")
    seeds: list[int] = param([0, 1, 2], ge(0), "mask seeds: every random/block/noise level is averaged over them")
    snr_db: list[float] = param([20.0, 10.0, 5.0, 0.0], doc="Gaussian noise levels, dB of signal over noise")
    targets: list[str] = param(["all"], doc="modalities dropped together per curve: 'all', or one modality name each")
    train_seeds: list[int] = param([], ge(0), "the training seeds whose runs are corrupted (empty: every seed)")
    batch_size: int = param(256, ge(1), "test segments scored per forward pass")


# --------------------------------------------------------------------------- corrupting one modality

def drop_mask(n: int, rate: float, protocol: str, rng: np.random.Generator) -> np.ndarray:
    """Which of n droppable steps are dropped (True): each with probability rate, or one block of round(rate * n)."""
    if protocol == "random":
        return rng.random(n) < rate
    k = int(round(rate * n))
    start = int(rng.integers(0, n - k + 1))
    mask = np.zeros(n, bool)
    mask[start:start + k] = True
    return mask


def missing(m: schema.Modality, dim: int) -> dict[str, np.ndarray]:
    """A modality as `assemble` stores it for a segment that lacks it: no steps, a zero pooled vector."""
    keys = m.batch_keys()
    out = {keys["sequence"]: np.zeros((0, dim), schema.STORE_DTYPE)}
    if m.pooled:
        out[keys["pooled"]] = np.zeros(dim, np.float32)
    if m.token_ids:
        out[keys["token_ids"]] = np.zeros(0, np.int32)
    return out


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """x + Gaussian noise with sigma = rms(x) * 10^(-snr/20), clipped as model inputs are; dtype kept."""
    if x.size == 0:
        return x
    values = np.asarray(x, np.float64)
    sigma = np.sqrt(np.mean(values ** 2)) * 10 ** (-snr_db / 20)
    noisy = np.clip(values + rng.normal(0.0, sigma, values.shape), -schema.CLIP_SIGMAS, schema.CLIP_SIGMAS)
    return noisy.astype(x.dtype)


class TextReencoder:
    """The dataset's own text encoder: token ids -> model inputs, as the `text` stage and `assemble` make them."""

    def __init__(self, data: AssembledData):
        from ..features.encoders import load_text_encoder, resolve_text_encoder
        from ..errors import UserError

        info = data.meta["modalities"]["text"]
        spec = resolve_text_encoder(info["encoder"]["name"])
        if spec.revision != info["encoder"].get("revision"):
            raise UserError(f"text encoder {spec.name!r} now resolves to revision {spec.revision[:12]}, the dataset "
                            f"was encoded with {str(info['encoder'].get('revision'))[:12]}: re-run `dvc repro`")
        self.tokenizer, self.model = load_text_encoder(spec, torch.device("cpu"))
        self.layers = (info.get("params") or {}).get("layers", [-1])
        self.dtype = (info.get("params") or {}).get("dtype", "float16")  # as the text stage stored the states
        self.max_steps = data.meta.get("max_steps", {}).get("text", 0)
        self.norm = data.norm
        self.unk = self.tokenizer.unk_token_id
        self.special = set(self.tokenizer.all_special_ids)
        self.cache: dict[bytes, dict[str, np.ndarray]] = {}

    def __call__(self, ids: list[np.ndarray], batch_size: int = 64) -> list[dict[str, np.ndarray]]:
        """Model inputs per id sequence. Sequences seen before come from a cache (at high drop rates many
        transcripts collapse to the same [CLS] [UNK] ... [SEP]); the rest are encoded in length-sorted batches."""
        keys = [np.asarray(x, np.int64).tobytes() for x in ids]
        if len(self.cache) + len(set(keys) - self.cache.keys()) > CACHE_ENTRIES:
            self.cache.clear()  # before choosing what to encode: a cleared entry must be encoded again
        todo = sorted({k: x for k, x in zip(keys, ids) if k not in self.cache}.items(), key=lambda kv: len(kv[1]))
        for start in range(0, len(todo), batch_size):
            self._encode(todo[start:start + batch_size])
        return [self.cache[k] for k in keys]

    def _encode(self, chunk: list[tuple[bytes, np.ndarray]]) -> None:
        from ..features.text import encode

        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(chunk), max(len(x) for _, x in chunk)), pad, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, (_, x) in enumerate(chunk):
            input_ids[row, :len(x)], mask[row, :len(x)] = torch.from_numpy(np.array(x, np.int64)), 1
        states = encode(self.model, input_ids, mask, self.layers, torch.device("cpu")).numpy()
        for row, (key, x) in enumerate(chunk):
            h = states[row, :len(x)]
            self.cache[key] = schema.to_model_input(schema.get("text"), h.astype(self.dtype), h.mean(0), self.max_steps,
                                                    self.norm)


# --------------------------------------------------------------------------- corrupted test sets

class Corruptor:
    """Corrupted copies of the test segments (dicts as `AssembledData.segment` makes them, with token ids)."""

    def __init__(self, data: AssembledData, rows: np.ndarray, reencode_text: bool):
        self.data = data
        self.clean = [data.segment(int(i), with_token_ids=True) for i in rows]
        self.fill = {m: schema.normalise(np.zeros(data.input_dims[m]), data.norm[f"{m}_mean"], data.norm[f"{m}_std"])
                     .astype(schema.STORE_DTYPE) for m in data.modalities}
        self.reencode_text = reencode_text  # some model reads the stored text states
        self._encoder = None
        # text features read from a feature pickle have no encoder to re-run: their steps drop as vectors
        text = data.meta["modalities"].get("text") or {}
        self.text_by_token = (text.get("encoder") or {}).get("source") != "pickle"

    def encoder(self) -> TextReencoder:
        if self._encoder is None:
            self._encoder = TextReencoder(self.data)
        return self._encoder

    def without(self, absent) -> list[dict]:
        """Every segment with the modalities in `absent` missing (training-time masking)."""
        out = []
        for seg in self.clean:
            seg = dict(seg)
            for m in absent:
                seg.update(missing(schema.get(m), self.data.input_dims[m]))
            out.append(seg)
        return out

    def drop(self, protocol: str, rate: float, seed: int, modalities) -> list[dict]:
        """random / block drop at `rate` of the steps of `modalities` (see the module docstring)."""
        rng = np.random.default_rng(seed)
        out, reencode = [], []
        for k, seg in enumerate(self.clean):
            seg = dict(seg)
            for m in modalities:
                if self._drop_one(seg, schema.get(m), protocol, rate, rng):
                    reencode.append(k)
            out.append(seg)
        if reencode and self.reencode_text:
            keys = schema.get("text").batch_keys()
            for k, inputs in zip(reencode, self.encoder()([out[k][keys["token_ids"]] for k in reencode])):
                out[k].update(inputs)
        return out

    def _drop_one(self, seg: dict, m: schema.Modality, protocol: str, rate: float, rng) -> bool:
        """Corrupt one modality of one segment in place; True when its token ids changed (re-encode them)."""
        keys = m.batch_keys()
        by_token = self.text_by_token and m.token_ids is not None and keys["token_ids"] in seg
        steps = np.asarray(seg[keys["token_ids"] if by_token else keys["sequence"]])
        if rate <= 0 or len(steps) == 0:
            return False
        if rate >= 1:  # every step dropped: the modality is gone
            seg.update(missing(m, self.data.input_dims[m.name]))
            return False
        where = np.flatnonzero(~np.isin(steps, list(self.encoder().special))) if by_token else np.arange(len(steps))
        dropped = where[drop_mask(len(where), rate, protocol, rng)]
        if len(where) and len(dropped) == len(where):
            seg.update(missing(m, self.data.input_dims[m.name]))
            return False
        if len(dropped) == 0:
            return False
        changed = steps.copy()
        changed[dropped] = self.encoder().unk if by_token else self.fill[m.name]
        seg[keys["token_ids"] if by_token else keys["sequence"]] = changed
        return by_token

    def noise(self, snr_db: float, seed: int, modalities) -> list[dict]:
        """Gaussian noise at snr_db on the normalised steps and pooled vectors of `modalities`."""
        rng = np.random.default_rng(seed)
        out = []
        for seg in self.clean:
            seg = dict(seg)
            for m in modalities:
                keys = schema.get(m).batch_keys()
                for key in (keys["sequence"], keys.get("pooled")):
                    if key in seg:
                        seg[key] = add_noise(np.asarray(seg[key]), snr_db, rng)
            out.append(seg)
        return out


# --------------------------------------------------------------------------- scoring

@dataclass
class Scored:
    """One trained run under test: its model and what it reads."""
    name: str
    seed: int
    model: torch.nn.Module
    dims: dict[str, int]
    finetune: bool


def load_scored(name: str, seed: int, path: str | Path) -> Scored:
    from ..training.train import load_checkpoint

    model, ckpt = load_checkpoint(Path(path) / "model.pt")
    return Scored(name, seed, model, ckpt["config"]["input_dims"], bool(ckpt["config"].get("text_finetune")))


@torch.no_grad()
def predict(run: Scored, segments: list[dict], batch_size: int) -> np.ndarray:
    """The model's outputs on these segments (scores, or logits for classification)."""
    outs = []
    for start in range(0, len(segments), batch_size):
        batch = collate(segments[start:start + batch_size], run.dims, with_token_ids=run.finetune)
        outs.append(run.model(batch)["pred"].float())
    return torch.cat(outs).numpy()


def metrics_of(task: str, pred: np.ndarray, labels: np.ndarray, num_classes: int, family: str = "mosi") -> dict:
    if task == "classification":
        return classification_metrics(pred, labels, num_classes)[0]
    return regression_metrics(pred, labels, family)


@dataclass
class Curve:
    name: str               # e.g. random-all, block-visual, subsets, noise-all
    protocol: str           # random | block | subsets | noise
    modalities: tuple       # targeted modalities (subsets: all of them)
    levels: list            # rates, SNRs (dB) or subset names ("-text", "-text-visual", ...)
    seeded: bool            # averaged over mask seeds


def curves(cfg: RobustnessParams, modalities: list[str]) -> list[Curve]:
    """The curves to measure on a dataset with these modalities."""
    out = []
    for target in cfg.targets:
        mods = tuple(modalities) if target == "all" else tuple(m for m in modalities if m == target)
        if not mods:
            continue
        out += [Curve(f"{p}-{target}", p, mods, list(cfg.rates), True) for p in ("random", "block")]
        out.append(Curve(f"noise-{target}", "noise", mods, list(cfg.snr_db), True))
    subsets = [c for k in range(1, len(modalities)) for c in itertools.combinations(modalities, k)]
    if subsets:
        out.append(Curve("subsets", "subsets", tuple(modalities), ["-" + "-".join(s) for s in subsets], False))
    return out


def corrupted(corruptor: Corruptor, curve: Curve, level, seed: int) -> list[dict]:
    if curve.protocol == "subsets":
        return corruptor.without(level[1:].split("-"))
    if curve.protocol == "noise":
        return corruptor.noise(level, seed, curve.modalities)
    return corruptor.drop(curve.protocol, level, seed, curve.modalities)


def measure(data: AssembledData, scored: list[Scored], cfg: RobustnessParams, progress=print) -> dict:
    """{curve: {run name: {train seed: [per level: [per mask seed: metrics]]}}} on the test split."""
    rows = data.split_rows("test")
    labels = data.labels[rows]
    num_classes = len(data.meta.get("classes") or []) if data.task == "classification" else 1
    reencode = any("text" in s.dims and not s.finetune for s in scored)
    corruptor = Corruptor(data, rows, reencode)
    out = {}
    family = data.conventions["metrics"]
    for curve in curves(cfg, data.modalities):
        table = out.setdefault(curve.name, {})
        for level in curve.levels:
            per_seed = {(s.name, s.seed): [] for s in scored}
            for mask_seed in (cfg.seeds if curve.seeded else [0]):
                segments = corrupted(corruptor, curve, level, mask_seed)
                for s in scored:
                    pred = predict(s, segments, cfg.batch_size)
                    per_seed[(s.name, s.seed)].append(metrics_of(data.task, pred, labels, num_classes, family))
            for (name, seed), values in per_seed.items():
                table.setdefault(name, {}).setdefault(seed, []).append(values)
        progress(f"robustness: {curve.name} done ({len(curve.levels)} levels)")
    return out


# --------------------------------------------------------------------------- summaries

def _mean(dicts: list[dict]) -> dict:
    """Metric-wise mean of several metric dicts (None where any is undefined)."""
    return {k: None if any(d[k] is None for d in dicts) else float(np.mean([d[k] for d in dicts])) for k in dicts[0]}


def _curve_summary(curve: Curve, by_seed: list[list[dict]]) -> dict:
    """by_seed: per training seed, the curve (one metrics dict per level, mask seeds averaged) -> mean over
    levels and AUC (rate curves) of every metric, each as mean ± std over training seeds."""
    entry = {}
    for key in by_seed[0][0]:
        entry[f"mean_{key}"] = over_seeds([_mean(c)[key] for c in by_seed])
        if curve.protocol in ("random", "block"):
            entry[f"auc_{key}"] = over_seeds([auc(curve.levels, [v[key] for v in c]) for c in by_seed])
    if curve.protocol == "subsets":
        entry["levels"] = {level: {k: over_seeds([c[i][k] for c in by_seed]) for k in by_seed[0][0]}
                           for i, level in enumerate(curve.levels)}
    return entry


def _curve_points(curve: Curve, by_seed: list[list[dict]], primary: str) -> list[dict]:
    """One record per level, metrics averaged over training seeds; the primary metric last (`dvc plots`' default y)."""
    keys = [k for k in by_seed[0][0] if k != primary] + [primary]
    return [{"level": level, **{k: over_seeds([c[i][k] for c in by_seed])["mean"] for k in keys}}
            for i, level in enumerate(curve.levels)]


def summarize(measured: dict, cfg: RobustnessParams, modalities: list[str], primary: str) -> tuple[dict, dict]:
    """(summary {run name: {curve: entry}}, points {curve: {run name: records}}) from `measure`'s output."""
    summary, points = {}, {}
    for curve in curves(cfg, modalities):
        for name, per_seed in measured.get(curve.name, {}).items():
            by_seed = [[_mean(masks) for masks in per_level] for per_level in per_seed.values()]
            summary.setdefault(name, {})[curve.name] = _curve_summary(curve, by_seed)
            points.setdefault(curve.name, {})[name] = _curve_points(curve, by_seed, primary)
    return summary, points


def write_outputs(out_dir: str | Path, summary: dict, points: dict, task: str, data_meta: dict,
                  train_seeds: dict[str, list[int]], rates: list[float] | None = None) -> None:
    """details.json (every metric: mean over levels and AUC, mean ± std over seeds), robustness.json (for
    `dvc metrics`: the primary metric only), curves/<curve>/<model>.json (for `dvc plots`), plots/<curve>.png."""
    import json

    from .stats import PRIMARY
    from .figures import robustness_curve

    out = Path(out_dir)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    metric = PRIMARY[task]
    for curve, by_model in points.items():
        (out / "curves" / curve).mkdir(exist_ok=True)
        for name, series in by_model.items():
            (out / "curves" / curve / f"{name}.json").write_text(json.dumps(series, indent=1) + "\n")
        xlabel = {"noise": "SNR (dB)", "subsets": "modalities missing"}.get(curve.split("-")[0], "drop rate")
        robustness_curve(by_model, metric, xlabel, out / "plots" / f"{curve}.png", f"test {metric}: {curve}")
    details = {"data": data_meta.get("provenance"), "task": task, "train_seeds": train_seeds, "rates": rates,
               "models": summary}
    (out / "details.json").write_text(json.dumps(details, indent=1) + "\n")
    lean = {name: {curve: {f"{kind}_{metric}{suffix}": entry[f"{kind}_{metric}"][stat]
                           for kind in ("auc", "mean") if f"{kind}_{metric}" in entry
                           for suffix, stat in (("", "mean"), ("_std", "std"))}
                   for curve, entry in curves_of.items()} for name, curves_of in summary.items()}
    (out / "robustness.json").write_text(json.dumps(lean, indent=1) + "\n")
