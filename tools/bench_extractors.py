"""Extractor comparisons: face detectors x detection sizes, and the acoustic sets.

    python -m tools.bench_extractors faces                     # real clips + demo, haar/mtcnn at 180/360/720 px
    python -m tools.bench_extractors acoustic                  # librosa vs egemaps vs compare: throughput,
                                                               #   then fusion test MAE over seeds 0 1 2

`faces` decodes each clip once (frames sampled as the visual stage samples them, at
`--fps`, short side at most the largest size asked) and runs every detector at every
detection size on the same frames, in this process, one after the other: it prints
the share of frames with a face found and detection frames per CPU-second (one
thread: the figure a visual worker gets from a core of its own, whatever else
runs on the machine) per clip of ../shared/data/real-clips and over the demo corpus.

`acoustic` builds the demo manifest, then in the same run extracts the acoustic
table with each extractor (fresh cache, the `compute` section of params.yaml) and
prints s of media per second and the ratio to librosa, then the descriptors alone
per CPU-second on the same decoded audio (robust to a busy machine); with --seeds it then
assembles a dataset per extractor (text and visual tables extracted once, with
params.yaml's settings) and trains each fusion model per seed, printing test MAE
mean +- std per extractor and model.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
REAL_CLIPS = REPO.parent / "shared" / "data" / "real-clips"


# --------------------------------------------------------------------------- faces

def sampled_frames(path: Path, fps: float, max_frames: int, max_short: int) -> list[np.ndarray]:
    from pipeline.data.media import iter_video_frames

    return [rgb for _, rgb in iter_video_frames(path, fps, max_frames, max_short=max_short, threads=1)]


def face_rates(frames: list[np.ndarray], options: list[tuple[str, int]]) -> dict:
    """(detector, size) -> {found: share of frames with a face, fps: detection frames/s}."""
    from pipeline.features.faces import detect_face

    out = {}
    for detector, size in options:
        detect_face(frames[0], detector, size)  # load the cascade / the networks outside the timing
        t = time.process_time()   # CPU time of this (single-threaded) process: machine load does not inflate it
        found = [detect_face(f, detector, size) is not None for f in frames]
        out[(detector, size)] = {"found": float(np.mean(found)), "n": len(found),
                                 "fps": len(found) / max(time.process_time() - t, 1e-6)}
    return out


def faces(args) -> int:
    import cv2
    import torch

    cv2.setNumThreads(1)
    torch.set_num_threads(1)  # one core, as in each worker of the visual stage
    options = [(d, s) for d in args.detectors for s in args.sizes]
    groups = {p.name: [p] for p in sorted(Path(args.real_clips).glob("*.mp4"))}
    if not groups:
        print(f"real clips not found at {args.real_clips}: demo only")
    demo = sorted((Path(args.demo) / "Raw").rglob("*.mp4"))[:args.demo_clips or None]
    if demo:
        groups[f"demo ({len(demo)} clips)"] = demo
    header = f"{'clips':28s} {'frames':>6s}  " + "  ".join(f"{d}@{s}".rjust(16) for d, s in options)
    print(f"face found (share of frames) / detection frames per CPU-second (1 thread); frames sampled at {args.fps:g} fps")
    print(header)
    report = {}
    for name, paths in groups.items():
        frames = [f for p in paths for f in sampled_frames(p, args.fps, args.max_frames, max(args.sizes))]
        rates = face_rates(frames, options)
        report[name] = {f"{d}@{s}": r for (d, s), r in rates.items()}
        size = "x".join(map(str, frames[0].shape[1::-1])) if len(paths) == 1 else "mixed"
        print(f"{name[:20]:20s} {size:>7s} {len(frames):6d}  " + "  ".join(
            f"{r['found']:6.0%} {r['fps']:7.1f}/s" for r in rates.values()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


# --------------------------------------------------------------------------- acoustic

def acoustic(args) -> int:
    import dataclasses

    from pipeline import params
    from pipeline.features.compute import Compute
    from pipeline.training.dataset import AssembleParams, assemble
    from pipeline.features import acoustic as ac, text, visual
    from pipeline.data.prepare import build_manifest

    raw = params.load(args.params)
    compute = params.read(raw, Compute)
    base = params.read(raw, ac.AcousticParams)
    with tempfile.TemporaryDirectory(prefix="msa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        manifest, _ = build_manifest({**raw.get("data", {}), "root": args.corpus}, progress=False)
        manifest.to_parquet(work / "manifest.parquet")
        media_s = float(manifest["duration"].sum())
        print(f"{len(manifest)} clips, {media_s / 60:.1f} min of media; compute {compute}")
        rates = {}
        for name in args.extractors:   # same run, fresh cache each: throughput side by side
            cfg = dataclasses.replace(base, extractor=name)
            meta = ac.run(manifest, cfg, work / f"cache-{name}", work / name / "acoustic.parquet", compute=compute,
                          show_progress=False)
            tp = meta["throughput"]
            rates[name] = tp["media_s_per_s"]
            print(f"acoustic {name:8s} dim {meta['dim']:4d}  {tp['extract_s']:6.1f} s  {tp['media_s_per_s']:7.1f} s media/s"
                  f"  ({rates[name] / rates[args.extractors[0]]:.2f}x {args.extractors[0]}; "
                  f"{meta['encoder']['id']} {meta['encoder']['revision']})")
        cpu = cpu_rates(manifest, base, args.extractors, args.cpu_clips)
        for name in args.extractors:
            print(f"acoustic {name:8s} descriptors alone: {cpu[name]:7.1f} s media per CPU-second "
                  f"({cpu[name] / cpu[args.extractors[0]]:.2f}x {args.extractors[0]}; {args.cpu_clips} clips decoded once)")
        if not args.seeds:
            if args.json:
                Path(args.json).write_text(json.dumps({"media_s_per_s": rates, "media_s_per_cpu_s": cpu}, indent=1))
            return 0
        for module in (text, visual):   # the other modalities once, as params.yaml sets them
            name = module.__name__.rsplit(".", 1)[1]
            module.run(manifest, params.read(raw, params.SECTIONS[f"features.{name}"]), work / "cache",
                       work / f"{name}.parquet", compute=compute, show_progress=False)
        results = {}
        for name in args.extractors:
            tables = {"text": work / "text.parquet", "visual": work / "visual.parquet",
                      "acoustic": work / name / "acoustic.parquet"}
            assemble(work / "manifest.parquet", tables, work / name / "dataset", params.read(raw, AssembleParams))
            for model in args.models:
                maes = [train_once(raw, model, work / name / "dataset", work / name / f"{model}-{seed}", seed)
                        for seed in args.seeds]
                results[(name, model)] = maes
                print(f"  {name:8s} {model:12s} test MAE {statistics.mean(maes):.3f} +- "
                      f"{statistics.stdev(maes) if len(maes) > 1 else 0:.3f}  ({', '.join(f'{m:.3f}' for m in maes)})",
                      flush=True)
        print("\n| acoustic set | " + " | ".join(args.models) + " |\n|---|" + "---|" * len(args.models))
        for name in args.extractors:
            print(f"| {name} | " + " | ".join(
                f"{statistics.mean(results[(name, m)]):.3f} ± {statistics.stdev(results[(name, m)]) if len(args.seeds) > 1 else 0:.3f}"
                for m in args.models) + " |")
        if args.json:
            Path(args.json).write_text(json.dumps({"media_s_per_s": rates, "media_s_per_cpu_s": cpu, "test_mae": {
                f"{n}/{m}": v for (n, m), v in results.items()}}, indent=1))
    return 0


def cpu_rates(manifest, base, extractors: list[str], clips: int) -> dict:
    """Seconds of media per CPU-second of each extractor's descriptors on the same decoded audio (one
    process; CPU time, so a busy machine does not skew the ratios as it skews wall time)."""
    import dataclasses

    from pipeline.features import acoustic as ac
    from pipeline.data.media import read_audio

    paths = [a or v for a, v in zip(manifest["audio_path"], manifest["video_path"]) if a or v][:clips]
    audio = [read_audio(p, base.sample_rate) for p in paths]
    media_s = sum(len(y) for y in audio) / base.sample_rate
    rates = {}
    for name in extractors:
        settings = ac.settings_from(dataclasses.replace(base, extractor=name))
        ac.acoustic_features(audio[0], settings)   # JIT / config loading outside the timing
        t = time.process_time()
        for y in audio:
            ac.acoustic_features(y, settings)
        rates[name] = media_s / max(time.process_time() - t, 1e-6)
    return rates


def train_once(raw: dict, model: str, dataset: Path, out: Path, seed: int) -> float:
    """One training run as `train@<model>` runs it (params.yaml's model section, this seed); test MAE."""
    import contextlib
    import io

    from pipeline import params
    from pipeline.models import MODELS
    from pipeline.training.train import TrainParams, train_model

    cfg = params.parse(TrainParams, {**raw.get("model", {}), "seed": seed}, "model")
    arch = params.parse(MODELS[model].config_class, params.lookup(raw, model), model)
    with contextlib.redirect_stdout(io.StringIO()):
        result = train_model(model, dataset, out, cfg, params.as_dict(arch), progress=False)
    return float(result["test"]["mae"])


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    cli = argparse.ArgumentParser(prog="python -m tools.bench_extractors", description=__doc__.split("\n\n")[0])
    sub = cli.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("faces", help="face-found rate and detection frames/s per detector and size")
    f.add_argument("--detectors", nargs="+", default=["haar", "mtcnn"])
    f.add_argument("--sizes", nargs="+", type=int, default=[180, 360, 720])
    f.add_argument("--real-clips", default=str(REAL_CLIPS))
    f.add_argument("--demo", default="raw/demo")
    f.add_argument("--demo-clips", type=int, default=0, help="first N demo clips (0 = all)")
    f.add_argument("--fps", type=float, default=3.0)
    f.add_argument("--max-frames", type=int, default=64)
    f.add_argument("--json")
    a = sub.add_parser("acoustic", help="acoustic sets: throughput, then fusion test MAE per seed")
    a.add_argument("--corpus", default="raw/demo")
    a.add_argument("--params", default="params.yaml")
    a.add_argument("--extractors", nargs="+", default=["librosa", "egemaps", "compare"])
    a.add_argument("--models", nargs="+", default=["gce", "gexsent", "late_fusion"])
    a.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="none: throughput only")
    a.add_argument("--cpu-clips", type=int, default=40, help="clips for the CPU-time comparison")
    a.add_argument("--workdir", help="keep tables and models here (default: a temporary folder)")
    a.add_argument("--json")
    args = cli.parse_args(argv)
    return faces(args) if args.cmd == "faces" else acoustic(args)


if __name__ == "__main__":
    sys.exit(main())
