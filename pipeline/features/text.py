"""Text features: any Hugging Face encoder through AutoTokenizer / AutoModel.

Per segment: the token ids (a later stage fine-tunes the encoder from them), the
token-level hidden states (mean of the chosen layers; stored as `dtype`), the
first-token and masked-mean pooled vectors, and whether the transcript was cut
at max_length. Segments are batched in order of token length so padding stays
small; on CUDA the model runs under bf16 autocast with SDPA attention.

The batches are formed over all of the corpus's segments, and only those holding
a segment to extract are run: CPU kernels round differently with a batch's shape
(MiniLM: up to 3e-6 between a 12-row and a 1-row batch), so this way a segment is
always encoded with the same companions, and a resumed or repaired run stores
exactly what an uninterrupted one does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..cache import FeatureCache, make_key, text_sha256
from .encoders import autocast, load_text_encoder, pick_device, resolve_text_encoder, text_config
from ..params import DEVICE, as_dict, ge, one_of, param, section
from .runner import Extracted, Plan, row_str, run_stage, stage_bar

VERSION = 1  # bump when the extraction itself changes: it is part of every cache key


@section("features.text")
@dataclass
class TextParams:
    source: str = param("pickle", one_of("pickle", "encoder"),
                        "data.format mmsa: the pickle's text features, or encode raw_text (raw corpora: always encoded)")
    encoder: str = param("minilm", doc="preset (minilm | modernbert-base) or a local Hugging Face folder")
    max_length: int = param(64, ge(2), "tokens; longer transcripts are truncated and recorded")
    layers: list[int] = param([-1], doc="hidden layers averaged into the token states (-1 = last)")
    lowercase: bool = param(False)
    dtype: str = param("float16", one_of("float16", "float32"), "stored token states; float16 halves the store")
    batch_size: int = param(64, ge(1))
    device: str = param("auto", DEVICE)


def columns(dtype: str) -> dict:
    return {
        "n_tokens": (pa.int32(), ()),
        "token_ids": (pa.int32(), ("n",)),
        "hidden": (pa.from_numpy_dtype(np.dtype(dtype)), ("n", "dim")),
        "pooled_mean": (pa.float32(), ("dim",)),
        "truncated": (pa.bool_(), ()),
    }


def run(manifest, cfg: TextParams, cache_root, out_path, *, compute=None, show_progress: bool = True) -> dict:
    """The `text` stage: manifest rows -> out_path (Parquet + JSON). Runs in this process (`compute` unused)."""
    spec = resolve_text_encoder(cfg.encoder)
    device = pick_device(cfg.device)
    settings = {"max_length": cfg.max_length, "layers": cfg.layers, "lowercase": cfg.lowercase, "dtype": cfg.dtype,
                "precision": "bf16" if device.type == "cuda" else "fp32"}
    prefix = ("text", VERSION, spec.id, spec.revision, settings)
    texts = [row_str(t) for t in manifest["text"]]
    plan = Plan(ids=list(manifest["id"]), keys=[make_key(*prefix, text_sha256(t)) for t in texts])
    durations = manifest["duration"].to_numpy(dtype=float) if "duration" in manifest else np.zeros(len(texts))
    for key, text, dur in zip(plan.keys, texts, durations):
        plan.units.setdefault(key, (text, float(dur)))

    cache = FeatureCache(cache_root, "text")
    batches = Batches(plan.units, spec, device, settings, cfg.batch_size)
    plan.groups, plan.claim_size = batches.groups, cfg.batch_size  # claimed a batch at a time

    def extract(todo: dict) -> Extracted:
        return _extract(batches, todo, settings, cache)

    meta = {"encoder": spec.as_meta(), "dim": _dim(spec), "params": as_dict(cfg), "device": str(device)}
    return run_stage("text", plan, cache, extract, columns(settings["dtype"]), meta, out_path,
                     show_progress=show_progress, progress_unit="seg")


def _dim(spec) -> int:
    return int(text_config(spec).hidden_size)


def tokenize(tokenizer, texts: list[str], max_length: int, lowercase: bool) -> tuple[list[list[int]], list[int]]:
    """Token ids cut to max_length (special tokens kept) and each transcript's full length."""
    texts = [t.lower() if lowercase else t for t in texts]
    # verbose=False: the full-length pass only measures (the cut is recorded per segment), so
    # transformers' "will result in indexing errors" warning about it would be untrue here
    full = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
    cut = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
    return cut, [len(ids) for ids in full]


class Batches:
    """The encoder, and every transcript of the plan tokenized and cut into batches of similar length, made once
    on first use (nothing loads when every segment is cached). The batches are formed over the whole plan, so a
    segment is encoded beside the same companions whatever else is missing: CPU results vary with a batch's
    shape in the last bits, and a resumed or shared run must store what an uninterrupted one does."""

    def __init__(self, units: dict, spec, device, settings: dict, batch_size: int):
        self.units, self.spec, self.device, self.settings, self.batch_size = units, spec, device, settings, batch_size
        self.keys: list[str] = []

    def prepare(self) -> None:
        if self.keys:
            return
        t_load = time.perf_counter()
        self.tokenizer, self.model = load_text_encoder(self.spec, self.device)
        self.load_s = time.perf_counter() - t_load
        self.keys = list(self.units)
        self.ids, self.full_lengths = tokenize(self.tokenizer, [self.units[k][0] for k in self.keys],
                                               self.settings["max_length"], self.settings["lowercase"])
        order = np.argsort([len(x) for x in self.ids], kind="stable")  # similar lengths share a batch
        self.batches = [order[start:start + self.batch_size] for start in range(0, len(self.keys), self.batch_size)]

    def groups(self) -> list[list[str]]:
        """The keys of each batch, in batch order (the runner claims them a batch at a time)."""
        self.prepare()
        return [[self.keys[i] for i in batch] for batch in self.batches]


def _extract(b: Batches, todo: dict, settings: dict, cache: FeatureCache) -> Extracted:
    """Encode the segments of `todo` in the batches the whole plan forms (see Batches)."""
    import torch

    b.prepare()
    keys, ids, full_lengths = b.keys, b.ids, b.full_lengths
    pad_id = b.tokenizer.pad_token_id if b.tokenizer.pad_token_id is not None else 0
    out, n_tokens, t_model = Extracted(), 0, 0.0
    bar = stage_bar()
    for batch in b.batches:
        wanted = [i for i in batch if keys[i] in todo]
        if not wanted:
            continue
        lengths = [len(ids[i]) for i in batch]
        input_ids = torch.full((len(batch), max(lengths)), pad_id, dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, i in enumerate(batch):
            input_ids[row, :lengths[row]] = torch.tensor(ids[i])
            mask[row, :lengths[row]] = 1
        t = time.perf_counter()
        try:
            states = encode(b.model, input_ids.to(b.device), mask.to(b.device), settings["layers"], b.device)
        except RuntimeError as err:  # e.g. out of memory: these segments fail this run, retried next run
            for i in wanted:
                out.errors[keys[i]] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            bar.update(len(wanted))
            continue
        t_model += time.perf_counter() - t
        states = states.cpu().numpy()
        for row, i in enumerate(batch):
            if keys[i] not in todo:  # a companion, stored already
                continue
            n = lengths[row]
            h = states[row, :n]
            truncated = full_lengths[i] > settings["max_length"]
            text = b.units[keys[i]][0]
            note = f"transcript of {full_lengths[i]} tokens truncated to max_length {settings['max_length']}" \
                if truncated else ("empty transcript" if not text.strip() else "")
            cache.put(keys[i], {
                "n_tokens": np.int32(n), "token_ids": np.asarray(ids[i], np.int32),
                "hidden": h.astype(settings["dtype"]), "pooled_mean": h.mean(axis=0).astype(np.float32), "truncated": np.bool_(truncated),
            }, content=text_sha256(text), note=note)
            out.media_s += b.units[keys[i]][1]
        n_tokens += int(sum(lengths))
        bar.update(len(wanted))
    out.clips, out.frames = len(todo), n_tokens
    out.extra = {"model_s": round(t_model, 3), "load_s": round(b.load_s, 3)}
    b.load_s = 0.0  # counted once
    return out


def encode(model, input_ids, mask, layers: list[int], device):
    """(B, L) ids -> (B, L, dim) float32: the mean of the chosen layers (-1 = the final output)."""
    import torch

    with torch.inference_mode(), autocast(device):
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=layers != [-1])
        picked = [out.last_hidden_state if i == -1 else out.hidden_states[i] for i in layers]
        return torch.stack(picked).float().mean(dim=0)
