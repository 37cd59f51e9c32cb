"""The data contract: which modalities exist, how a feature stage stores them, how a stored row
becomes model input. Declared once, here; every other module loops over `REGISTRY`.

A modality is written by the feature stage of the same name to `features/<name>.parquet`, one
row per segment (column `id` joins the manifest):

    <length>      int32       n, the number of steps (tokens, frames, analysis hops)
    <sequence>    list<num>   the (n, dim) step matrix, flattened row-major (dim in the metadata)
    <pooled>      list<f32>   optional: one (dim,) vector per segment (text: masked-mean state)
    <token_ids>   list<i32>   optional: the token ids the states came from (for fine-tuning)
    <extras>      any         report columns; `assemble` summarises each into its meta.json
                              ('mean' of all values, or 'mean_step': mean difference within rows)

and the Parquet schema metadata (key b"pipeline") holds the stage's JSON report, with at least
`dim` and `encoder` ({id, revision, ...}).

`to_model_input` is the one function that turns a stored row into what a model sees: shrink the
sequence to `max_steps` (mean-pool, time order kept), normalise with statistics of the training
split, clip at CLIP_SIGMAS, and store as float16. `assemble` runs it on every row of the corpus;
`predict` runs it on one new clip with the statistics saved in the checkpoint, so training and
serving cannot drift apart.

Adding a modality (say a speech encoder as `speech`) is one `register(Modality(...))` here, one
extractor (`pipeline/features/speech.py` writing the columns above) and one stage in dvc.yaml.

Bottom layer: imports numpy (pyarrow lazily), nothing of ours.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STD_FLOOR = 1e-3    # features nearly constant on train (a dead CNN channel) are not blown up
CLIP_SIGMAS = 20.0  # a 20-sigma step is an outlier, and float16 must not overflow
STORE_DTYPE = np.float16  # model inputs as stored by assemble and rebuilt by predict
META_KEY = b"pipeline"    # Parquet schema metadata key of a stage's JSON report


def read_meta(path) -> dict:
    """A table's stage report, from the Parquet footer (the data is not read)."""
    import json

    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[META_KEY]) if META_KEY in metadata else {}


@dataclass(frozen=True)
class Modality:
    name: str                          # batch key, assemble.max_steps key, features/<name>.parquet
    sequence: str                      # list column: the (n, dim) steps, flattened
    length: str                        # int column: n
    ordered: bool                      # True: the steps carry their own order (token states);
                                       # False: models add positions (frames, audio hops)
    pooled: str | None = None          # list column: a (dim,) vector per segment, normalised on its own
    token_ids: str | None = None       # list column: the encoder's token ids, for fine-tuning it
    from_transcript: bool = False      # extracted from the transcript, not from the media files
    extras: tuple[tuple[str, str, str], ...] = ()  # (column, reducer, what assemble reports about it)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the stage writes, `id` first."""
        optional = [c for c in (self.pooled, self.token_ids) if c]
        return ("id", self.length, self.sequence, *optional, *(c for c, _, _ in self.extras))

    def batch_keys(self) -> dict[str, str]:
        """Keys of this modality in a model batch."""
        keys = {"sequence": self.name, "mask": f"{self.name}_mask"}
        if self.pooled:
            keys["pooled"] = f"{self.name}_pooled"
        if self.token_ids:
            keys.update(token_ids=f"{self.name}_token_ids", token_mask=f"{self.name}_token_mask")
        return keys


def segment_id(video_id: str, clip_id: str) -> str:
    """The `id` that joins the manifest and every feature table."""
    return f"{video_id}/{clip_id}"


REGISTRY: dict[str, Modality] = {}


def register(modality: Modality) -> Modality:
    """Declare a modality (its order of registration is the canonical order everywhere)."""
    if not modality.name.isidentifier():
        raise ValueError(f"modality name must be an identifier, got {modality.name!r}")
    REGISTRY[modality.name] = modality
    return modality


def unregister(name: str) -> None:
    REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get(name: str) -> Modality:
    if name not in REGISTRY:
        raise KeyError(f"unknown modality {name!r}; registered: {', '.join(REGISTRY)}")
    return REGISTRY[name]


register(Modality("text", sequence="hidden", length="n_tokens", ordered=True, pooled="pooled_mean",
                  token_ids="token_ids", from_transcript=True, extras=(("truncated", "mean", "fraction of transcripts cut at max_length"),)))
register(Modality("visual", sequence="emb", length="n_frames", ordered=False,
                  extras=(("face_found", "mean", "fraction of frames with a face found"),
                          ("timestamps", "mean_step", "mean seconds between sampled frames"))))
register(Modality("acoustic", sequence="feats", length="n_frames", ordered=False))


# --------------------------------------------------------------------------- normalisation

def shrink(seq: np.ndarray, max_steps: int) -> np.ndarray:
    """Mean-pool a (L, D) sequence down to at most max_steps steps, keeping its time order (0 = no cap)."""
    if max_steps <= 0 or len(seq) <= max_steps:
        return seq
    bounds = np.linspace(0, len(seq), max_steps + 1).round().astype(np.int64)
    return np.add.reduceat(seq.astype(np.float64), bounds[:-1], axis=0) / np.diff(bounds)[:, None]


def shrunk_length(n: int, max_steps: int) -> int:
    return n if max_steps <= 0 else min(n, max_steps)


class Moments:
    """Streaming mean/std over the rows of many (n, dim) blocks, float64 accumulation."""

    def __init__(self, dim: int):
        self.total, self.total_sq, self.count = np.zeros(dim), np.zeros(dim), 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, np.float64).reshape(-1, len(self.total))
        self.total += block.sum(0)
        self.total_sq += (block ** 2).sum(0)
        self.count += len(block)

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) as float32; (0, 1) when nothing was added."""
        if self.count == 0:
            return np.zeros(len(self.total), np.float32), np.ones(len(self.total), np.float32)
        mean = self.total / self.count
        std = np.sqrt(np.maximum(self.total_sq / self.count - mean ** 2, 0.0))
        return mean.astype(np.float32), np.maximum(std, STD_FLOOR).astype(np.float32)


def normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    return np.clip((np.asarray(x, np.float64) - mean) / std, -CLIP_SIGMAS, CLIP_SIGMAS)


def norm_keys(modality: Modality) -> list[str]:
    """Names of the statistics a modality needs: '<m>' for its steps, '<m>_pooled' for its vector."""
    return [modality.name] + ([f"{modality.name}_pooled"] if modality.pooled else [])


def to_model_input(modality: Modality, sequence: np.ndarray, pooled: np.ndarray | None, max_steps: int,
                   norm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One stored segment -> its model inputs (assemble and predict both call this).

    sequence (n, dim) as stored, pooled (dim,) or None; norm holds '<key>_mean' / '<key>_std' for
    each of norm_keys(modality). Returns {m: (n', dim) float16} (+ {'<m>_pooled': (dim,) float32}).
    """
    m = modality.name
    steps = shrink(np.asarray(sequence), max_steps)
    out = {m: normalise(steps, norm[f"{m}_mean"], norm[f"{m}_std"]).astype(STORE_DTYPE)}
    if modality.pooled:
        out[f"{m}_pooled"] = normalise(pooled, norm[f"{m}_pooled_mean"], norm[f"{m}_pooled_std"]).astype(np.float32)
    return out


def pad(sequences: list[np.ndarray], dim: int, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length (n_i, dim) arrays -> (B, L, dim) zeros-padded, (B, L) mask (True = real).
    A batch whose rows are all empty still gets length 1 (all False)."""
    lengths = np.array([len(s) for s in sequences], np.int64)
    longest = max(int(lengths.max(initial=0)), 1)
    x = np.zeros((len(sequences), longest) + ((dim,) if dim else ()), dtype)
    for b, s in enumerate(sequences):
        x[b, :lengths[b]] = s
    return x, np.arange(longest)[None, :] < lengths[:, None]
