"""Acoustic features: frame-level descriptors at a fixed hop, from one of three extractors.

Audio comes from the separate file when the manifest has one, else it is demuxed
from the clip; FFmpeg downmixes to mono and resamples to `sample_rate` while
decoding. `extractor` picks the descriptors per analysis step (hop_ms):

    librosa   MFCCs + deltas + delta-deltas, f0 (Hz, 0 when unvoiced) and voicing,
              RMS energy, spectral centroid, flux and rolloff, zero-crossing rate (window win_ms)
    egemaps   openSMILE eGeMAPSv02 low-level descriptors (25: loudness, pitch, jitter,
              shimmer, HNR, formants, spectral slope, MFCC 1-4, ...), the minimal set
              designed for affect
    compare   openSMILE ComParE_2016 low-level descriptors (65) + their deltas (65)

then an optional mean-pool over `pool` steps to shorten the sequence. librosa's f0
is a param: `yin` (fast; voicing = normalised autocorrelation at the YIN period) or
`pyin` (probabilistic YIN + HMM: better voicing decisions, far slower). openSMILE's
configs compute every descriptor on their own 10 ms grid with their own windows;
its frames are put on the stage's hop grid (step k centred at k * hop_ms, as
librosa's) by linear interpolation, which at the default 10 ms hop is an exact
shift. No normalisation here: training computes statistics on the train split
only. Clips run in parallel (joblib or Dask), each worker writing its clip's
entry into the shared cache.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ..cache import FeatureCache, file_sha256, make_key
from .compute import Compute, parallel_map
from ..errors import UserError
from ..data.media import MediaError, read_audio
from ..params import as_dict, between, fail, ge, gt, one_of, param, section
from .runner import Extracted, Plan, row_str, run_stage, stage_bar

VERSION = 2  # 2: extractor choice (librosa | egemaps | compare)
PARALLEL = True  # clips run on `compute` (params section compute)
COLUMNS = {"n_frames": (pa.int32(), ()), "feats": (pa.float32(), ("n", "dim"))}
N_MELS = 40
OPENSMILE_SETS = {"egemaps": "eGeMAPSv02", "compare": "ComParE_2016"}  # extractor -> openSMILE feature set
OPENSMILE_HOP_S = 0.010  # the frame step of both openSMILE configs
OPENSMILE_FRAME_S = {"egemaps": 0.020, "compare": 0.060}  # the frame each config reports its descriptors on
DELTA_WIN = 2  # ComParE's delta regression window (openSMILE cDeltaRegression deltawin)


def feature_names(n_mfcc: int) -> list[str]:
    mfcc = [f"mfcc_{i}" for i in range(n_mfcc)]
    return (mfcc + [f"d_{m}" for m in mfcc] + [f"dd_{m}" for m in mfcc]
            + ["f0_hz", "voicing", "rms", "spectral_centroid", "spectral_flux", "spectral_rolloff", "zcr"])


@section("features.acoustic")
@dataclass
class AcousticParams:
    extractor: str = param("compare", one_of("librosa", "egemaps", "compare"),
                           "librosa descriptors | openSMILE eGeMAPSv02 (25 LLDs) | ComParE_2016 (65 LLDs + deltas)")
    sample_rate: int = param(16000, ge(4000), "Hz; audio is resampled to it while decoding")
    hop_ms: float = param(10.0, gt(0), "analysis hop")
    win_ms: float = param(25.0, gt(0), "analysis window")
    n_mfcc: int = param(13, between(1, N_MELS), "librosa: MFCCs (+ deltas and delta-deltas)")
    f0: str = param("yin", one_of("yin", "pyin"), "librosa: yin (fast) | pyin (better voicing decisions, ~10x slower)")
    fmin: float = param(60.0, gt(0), "librosa: lowest f0 searched, Hz")
    fmax: float = param(500.0, gt(0), "librosa: highest f0 searched, Hz")
    pool: int = param(5, ge(1), "mean-pool this many hops into one step (1 = none)")

    def __post_init__(self):
        if self.fmax <= self.fmin:
            raise fail("fmax", self.fmax, f"> fmin ({self.fmin:g})")
        if self.fmax >= self.sample_rate / 2:
            raise fail("fmax", self.fmax, f"< half the sample rate ({self.sample_rate / 2:g})")
        if self.win_ms * self.sample_rate < 2000:
            raise fail("win_ms", self.win_ms, "a window of at least 2 samples")


def settings_from(cfg: AcousticParams) -> dict:
    """The params that change the result (they key the cache): openSMILE ignores librosa's knobs."""
    settings = as_dict(cfg)
    if cfg.extractor != "librosa":
        settings = {k: settings[k] for k in ("extractor", "sample_rate", "hop_ms", "pool")}
    return settings


def extractor_id(extractor: str) -> dict:
    """{id, revision} of the library that computes the descriptors (keys the cache, goes in the report)."""
    if extractor == "librosa":
        import librosa

        return {"id": "librosa", "revision": librosa.__version__}
    try:
        import opensmile
    except ImportError:
        raise UserError(f"features.acoustic.extractor: {extractor!r} needs the opensmile package "
                        "(pip install opensmile; `make install` does)") from None
    return {"id": f"opensmile:{OPENSMILE_SETS[extractor]}", "revision": opensmile.__version__}


def feature_names_of(settings: dict) -> list[str]:
    if settings["extractor"] == "librosa":
        return feature_names(settings["n_mfcc"])
    names = list(_smile(settings["extractor"]).feature_names)
    return names + [f"{n}_de" for n in names] if settings["extractor"] == "compare" else names


def acoustic_features(y: np.ndarray, s: dict) -> np.ndarray:
    """Mono float32 audio at s['sample_rate'] -> (steps, dim) float32, in feature_names_of(s) order."""
    feats = librosa_features(y, s) if s["extractor"] == "librosa" else opensmile_features(y, s)
    return pool_steps(feats, s["pool"])


def librosa_features(y: np.ndarray, s: dict) -> np.ndarray:
    import librosa

    sr = s["sample_rate"]
    hop, win = int(round(sr * s["hop_ms"] / 1000)), int(round(sr * s["win_ms"] / 1000))
    if len(y) < win:
        raise MediaError(f"audio shorter than one analysis window ({1000 * len(y) / sr:.1f} ms < {s['win_ms']:g} ms)")
    n_fft = 1 << (win - 1).bit_length()
    mag = np.abs(librosa.stft(y, n_fft=n_fft, hop_length=hop, win_length=win, center=True))
    mel = librosa.feature.melspectrogram(S=mag ** 2, sr=sr, n_fft=n_fft, n_mels=N_MELS)
    mfcc = librosa.feature.mfcc(S=librosa.power_to_db(mel), n_mfcc=s["n_mfcc"])
    d1 = librosa.feature.delta(mfcc, order=1, mode="nearest")
    d2 = librosa.feature.delta(mfcc, order=2, mode="nearest")
    rms = librosa.feature.rms(S=mag, frame_length=n_fft)
    centroid = librosa.feature.spectral_centroid(S=mag, sr=sr, n_fft=n_fft)
    rolloff = librosa.feature.spectral_rolloff(S=mag, sr=sr, n_fft=n_fft)
    rise = np.diff(mag, axis=1, prepend=mag[:, :1]).clip(min=0)   # positive spectral change only
    flux = np.sqrt((rise ** 2).sum(axis=0, keepdims=True))
    zcr = librosa.feature.zero_crossing_rate(y, frame_length=win, hop_length=hop, center=True)
    f0, voicing = pitch(y, s, hop)
    parts = [mfcc, d1, d2, f0[None], voicing[None], rms, centroid, flux, rolloff, zcr]
    steps = min(p.shape[1] for p in parts)  # all centred at the same hop: equal, min() guards off-by-one
    return np.concatenate([p[:, :steps] for p in parts], axis=0).T.astype(np.float32)


_SMILES: dict = {}  # extractor -> opensmile.Smile, built once per process (loading a config costs ~0.1-0.4 s)


def _smile(extractor: str):
    if extractor not in _SMILES:
        import opensmile

        _SMILES[extractor] = opensmile.Smile(feature_set=opensmile.FeatureSet[OPENSMILE_SETS[extractor]],
                                             feature_level=opensmile.FeatureLevel.LowLevelDescriptors)
    return _SMILES[extractor]


def opensmile_features(y: np.ndarray, s: dict) -> np.ndarray:
    """openSMILE low-level descriptors (+ deltas for ComParE) on the stage's hop grid."""
    sr, frame_s = s["sample_rate"], OPENSMILE_FRAME_S[s["extractor"]]
    if len(y) < frame_s * sr:
        raise MediaError(f"audio shorter than one openSMILE frame ({1000 * len(y) / sr:.1f} ms < {1000 * frame_s:g} ms)")
    frames = _smile(s["extractor"]).process_signal(y, sr)
    lld = frames.to_numpy(np.float64)
    if s["extractor"] == "compare":
        lld = np.concatenate([lld, deltas(lld, DELTA_WIN)], axis=1)
    centres = frames.index.get_level_values("start").total_seconds().to_numpy() + frame_s / 2
    hop = int(round(sr * s["hop_ms"] / 1000))
    grid = np.arange(1 + len(y) // hop) * hop / sr   # librosa's centred frames: the same step count
    if np.isclose(s["hop_ms"] / 1000, OPENSMILE_HOP_S):   # the default: an exact shift, no blending
        picks = np.clip(np.round((grid - centres[0]) / OPENSMILE_HOP_S).astype(int), 0, len(lld) - 1)
        return lld[picks].astype(np.float32)
    return np.stack([np.interp(grid, centres, col) for col in lld.T], axis=1).astype(np.float32)


def deltas(x: np.ndarray, win: int) -> np.ndarray:
    """openSMILE's delta regression over +-win frames (edges repeat the first/last frame)."""
    padded = np.pad(x, ((win, win), (0, 0)), mode="edge")
    n = len(x)
    num = sum(k * (padded[win + k:win + k + n] - padded[win - k:win - k + n]) for k in range(1, win + 1))
    return num / (2 * sum(k * k for k in range(1, win + 1)))


def pitch(y: np.ndarray, s: dict, hop: int) -> tuple[np.ndarray, np.ndarray]:
    """(f0 Hz with 0 where unvoiced, voicing in [0, 1]) per hop."""
    import librosa

    sr = s["sample_rate"]
    frame = 1 << int(np.ceil(np.log2(2.2 * sr / s["fmin"])))  # two periods of fmin fit in the window
    if s["f0"] == "pyin":
        f0, _, prob = librosa.pyin(y, fmin=s["fmin"], fmax=s["fmax"], sr=sr, frame_length=frame, hop_length=hop,
                                   center=True)
        return np.nan_to_num(f0, nan=0.0), prob
    f0 = librosa.yin(y, fmin=s["fmin"], fmax=s["fmax"], sr=sr, frame_length=frame, hop_length=hop, center=True)
    # voicing: normalised autocorrelation of each frame at the period YIN chose
    frames = librosa.util.frame(np.pad(y, frame // 2), frame_length=frame, hop_length=hop)[:, :len(f0)]
    spec = np.fft.rfft(frames, n=2 * frame, axis=0)
    acf = np.fft.irfft(np.abs(spec) ** 2, axis=0)[:frame]
    lag = np.clip(np.round(sr / f0).astype(int), 1, frame - 1)
    at_lag = acf[lag, np.arange(len(f0))] * frame / (frame - lag)   # unbiased at that lag
    voicing = np.where(acf[0] > 1e-10, at_lag / np.maximum(acf[0], 1e-10), 0.0).clip(0, 1)
    return np.where(voicing > 0.5, f0, 0.0), voicing


def pool_steps(feats: np.ndarray, k: int) -> np.ndarray:
    """Mean over consecutive groups of k steps (the last group may be shorter)."""
    if k <= 1:
        return feats
    starts = np.arange(0, len(feats), k)
    counts = np.diff(np.append(starts, len(feats)))[:, None]
    return (np.add.reduceat(feats, starts, axis=0) / counts).astype(np.float32)


def extract_clip(unit: dict) -> dict:
    """Work unit (runs in a worker): decode, compute, write the cache entry; return the sizes."""
    t0 = time.perf_counter()
    s = unit["settings"]
    y = read_audio(unit["path"], s["sample_rate"])
    t1 = time.perf_counter()
    if not np.isfinite(y).all():
        raise MediaError("audio has non-finite samples")
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # one BLAS thread everywhere: the same sums in the same order on every backend
        feats = acoustic_features(y, s)
    FeatureCache(unit["cache_root"], "acoustic").put(unit["key"], {"n_frames": np.int32(len(feats)), "feats": feats},
                                                     content=unit["content"])
    return {"frames": len(feats), "media_s": len(y) / s["sample_rate"],
            "decode_s": t1 - t0, "features_s": time.perf_counter() - t1}


def plan_rows(manifest, settings: dict, cache_root) -> Plan:
    library = extractor_id(settings["extractor"])
    prefix = ("acoustic", VERSION, library["id"], library["revision"], settings)
    plan = Plan(ids=list(manifest["id"]), keys=[])
    for i, row in enumerate(manifest.to_dict("records")):
        media, audio_path, video_path = row_str(row.get("media")), row_str(row.get("audio_path")), row_str(row.get("video_path"))
        if media == "image":
            reason = "no audio (image segment)"
        elif media != "video" and not audio_path:
            reason = "no media (transcript-only segment)"
        elif not audio_path and not row.get("has_audio", True):
            reason = "no audio track"
        else:
            reason = None
        if reason:
            plan.keys.append(None)
            plan.skipped[i] = reason
            continue
        path = audio_path or video_path
        try:  # the separate audio file is what is decoded, so it is what is hashed
            digest = file_sha256(audio_path) if audio_path else (row_str(row.get("content_hash")) or file_sha256(path))
        except OSError as err:
            plan.keys.append(None)
            plan.skipped[i] = f"unreadable media file ({err.strerror or err})"
            continue
        key = make_key(*prefix, digest)
        plan.keys.append(key)
        plan.units.setdefault(key, {"key": key, "path": path, "settings": settings, "cache_root": str(cache_root),
                                    "content": digest})
    return plan


def run(manifest, cfg: AcousticParams, cache_root, out_path, *, compute: Compute | None = None,
        show_progress: bool = True) -> dict:
    """The `acoustic` stage: manifest rows -> out_path (Parquet + JSON); clips run on `compute`."""
    settings = settings_from(cfg)
    compute = compute or Compute(n_jobs=1)
    cache = FeatureCache(cache_root, "acoustic")
    plan = plan_rows(manifest, settings, cache_root)
    plan.claim_min = max(plan.claim_min, 2 * compute.workers)  # claim enough to keep every worker busy

    def extract(todo: dict) -> Extracted:
        units = list(todo.values())
        out = Extracted()
        decode_s = features_s = 0.0
        bar = stage_bar()
        for i, result, error, bad_input in parallel_map(extract_clip, units, compute):
            bar.update(1)
            out.clips += 1
            if error is not None:
                if bad_input:
                    cache.put_failure(units[i]["key"], error, content=units[i]["content"])
                else:
                    out.errors[units[i]["key"]] = error
                continue
            out.frames += result["frames"]
            out.media_s += result["media_s"]
            decode_s += result["decode_s"]
            features_s += result["features_s"]
        out.extra = {"worker_decode_s": round(decode_s, 3), "worker_features_s": round(features_s, 3),
                     "extractor": settings["extractor"], "f0": settings.get("f0"), "workers": compute.workers, "backend": compute.backend}
        return out

    names = feature_names_of(settings)
    meta = {"encoder": extractor_id(settings["extractor"]), "dim": len(names), "feature_names": names,
            "params": as_dict(cfg), "frame_rate_hz": 1000.0 / (settings["hop_ms"] * settings["pool"])}
    if not plan.units and len(plan.ids):
        meta["note"] = "no media: nothing to extract"
    return run_stage("acoustic", plan, cache, extract, COLUMNS, meta, out_path, show_progress=show_progress,
                     progress_desc=f"acoustic ({settings['extractor']})")
