"""Benchmarks. One subcommand per part of the pipeline (add `train` beside `features`).

    python -m pipeline.bench features                          # 90-clip demo corpus, params.yaml as is
    python -m pipeline.bench features --clips 2200 --size 480x360 \\
        --set features.text.encoder=modernbert-base --set features.visual.encoder=clip-vit-b-32
    python -m pipeline.bench features --corpus raw/demo --set features.visual.encoder=random:clip-vit-b-32

`features` makes (or takes, with --corpus) a corpus in the MMSA layout, builds its
manifest with `prepare`, runs text, visual and acoustic cold (fresh cache) and
prints per stage clips/s, frames/s and seconds of media per second. In the same
run it measures the ceilings: decode-only throughput of the visual workers
(decode + sample + face crop, same workers) and encoder-only throughput on random
inputs at the same batch size (visual: uint8 frames; text: random token ids in the
corpus's own batch shapes), and prints achieved / ceiling. Acoustic is timed
with yin and with pyin on the same clips. `random:<preset>` encoders are the
production architectures with random weights, for machines that cannot download
the real ones (throughput does not depend on the weights).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml


def _set(params: dict, assignment: str) -> None:
    key, _, value = assignment.partition("=")
    node = params
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = yaml.safe_load(value)


def _corpus(args, workdir: Path) -> Path:
    if args.corpus:
        return Path(args.corpus)
    from .demo import generate_corpus

    out = Path(args.out) if args.out else workdir / "corpus"
    if (out / "label.csv").is_file() and sum(1 for _ in open(out / "label.csv")) - 1 == args.clips:
        print(f"corpus: reusing {out} ({args.clips} clips)")
        return out
    t = time.perf_counter()
    width, height = (int(v) for v in args.size.lower().split("x"))
    generate_corpus(out, args.clips, seed=args.seed, size=(width, height), jobs=max(1, os.cpu_count() or 1))
    print(f"corpus: generated {args.clips} clips ({args.size}) in {out} in {time.perf_counter() - t:.1f} s")
    return out


def _timed_batches(fn, batches, warmup: int = 1) -> float:
    """Seconds for fn over all batches, after `warmup` untimed calls (CUDA synchronised)."""
    import torch

    for b in batches[:warmup]:
        fn(b)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    for b in batches:
        fn(b)
    sync()
    return time.perf_counter() - t


def text_ceiling(manifest, params: dict) -> dict:
    """The encoder alone on random token ids, in the corpus's own (length-sorted) batch shapes."""
    import torch

    from .encoders import load_text_encoder, pick_device, resolve_text_encoder
    from .features.text import encode, tokenize

    p = params["features"]["text"]
    device = pick_device(p.get("device", "auto"))
    tokenizer, model = load_text_encoder(resolve_text_encoder(str(p["encoder"])), device)
    texts = sorted(set(manifest["text"].astype(str)))
    ids, _ = tokenize(tokenizer, texts, int(p["max_length"]), bool(p.get("lowercase")))
    lengths = np.sort([len(x) for x in ids])
    bs = int(p.get("batch_size", 64))
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, tokenizer.vocab_size, (len(lengths[i:i + bs]), int(lengths[i:i + bs].max())), generator=g)
               for i in range(0, len(lengths), bs)]
    layers = [int(i) for i in p.get("layers", [-1])]
    seconds = _timed_batches(lambda b: encode(model, b.to(device), torch.ones_like(b).to(device), layers, device), batches)
    return {"segments_per_s": len(lengths) / seconds, "tokens_per_s": float(lengths.sum()) / seconds, "segments": len(lengths)}


def visual_ceilings(manifest, params: dict) -> dict:
    """Decode-only (the same workers, no encoder) and encoder-only (random frames) throughput."""
    import torch

    from .compute import Compute, parallel_map
    from .encoders import load_image_encoder, pick_device, resolve_image_encoder
    from .features import visual

    p = params["features"]["visual"]
    compute = Compute.from_params(params)
    device = pick_device(p.get("device", "auto"))
    encoder = load_image_encoder(resolve_image_encoder(str(p["encoder"]), str(p.get("pretrained", "") or "")), device)
    settings = visual.settings_from(p)
    threads = 0 if compute.workers <= 1 else max(1, (os.cpu_count() or 1) // compute.workers)
    plan = visual.plan_rows(manifest, ("bench",), settings, threads)
    units = [{**u, "image_size": encoder.image_size} for u in plan.units.values()]
    t, frames, media_s = time.perf_counter(), 0, 0.0
    for _, clip, error, _ in parallel_map(visual.decode_clip, units, compute):
        if error is None:
            frames += len(clip["pixels"])
            media_s += clip["media_s"]
    decode_s = time.perf_counter() - t
    bs = int(p.get("batch_size", 64))
    n_batches = max(3, min(20, frames // bs))
    pixels = torch.randint(0, 256, (bs, encoder.image_size, encoder.image_size, 3), dtype=torch.uint8)
    encode_s = _timed_batches(encoder, [pixels] * n_batches)
    return {"decode": {"clips_per_s": len(units) / decode_s, "frames_per_s": frames / decode_s,
                       "media_s_per_s": media_s / decode_s},
            "encoder": {"frames_per_s": n_batches * bs / encode_s}}


def features(args) -> int:
    from .config import load_params
    from .features import acoustic, text, visual
    from .prepare import build_manifest

    params = load_params(args.params)
    for assignment in args.set or []:
        _set(params, assignment)
    stages = args.stages.split(",")
    with tempfile.TemporaryDirectory(prefix="msa-bench-") as tmp:
        workdir = Path(tmp)
        root = _corpus(args, workdir)
        manifest, rejects = build_manifest({**params.get("data", {}), "root": str(root)}, progress=False)
        media_s = float(manifest["duration"].sum())
        print(f"manifest: {len(manifest)} segments, {media_s / 60:.1f} min of media, {len(rejects)} rejected; "
              f"compute {params.get('compute')}; cpu cores {os.cpu_count()}")
        cache = Path(args.cache) if args.cache else workdir / "cache"
        report: dict = {"segments": len(manifest), "media_s": media_s, "stages": {}, "params": params["features"]}
        modules = {"text": text, "visual": visual, "acoustic": acoustic}
        total = 0.0
        for name in stages:
            t = time.perf_counter()
            meta = modules[name].run(manifest, params, cache, workdir / f"{name}.parquet", show_progress=args.progress)
            wall = time.perf_counter() - t
            total += wall
            tp = meta["throughput"]
            report["stages"][name] = {"wall_s": wall, "throughput": tp, "encoder": meta["encoder"],
                                      "ok": meta["counts"]["ok"], "failed": meta["counts"]["failed"]}
            unit = "tokens" if name == "text" else ("analysis steps" if name == "acoustic" else "frames")
            print(f"{name:9s} {wall:7.1f} s  {tp.get('clips_per_s', 0):8.2f} clips/s  {tp.get('frames_per_s', 0):9.1f} "
                  f"{unit}/s  {tp.get('media_s_per_s', 0):7.1f} s media/s  ({meta['counts']['ok']} ok, "
                  f"{meta['counts']['failed']} failed; encoder {meta['encoder'].get('id')})")
        print(f"all {len(stages)} stages: {total:.1f} s for {len(manifest)} clips ({media_s / 60:.1f} min of media)")
        report["total_s"] = total

        if "text" in stages:
            ceiling = text_ceiling(manifest, params)
            tp = report["stages"]["text"]["throughput"]
            steady = tp["clips"] / max(1e-9, tp["extract_s"] - tp.get("load_s", 0))
            report["stages"]["text"]["ceiling"] = ceiling
            print(f"text      encoder ceiling {ceiling['segments_per_s']:.1f} segments/s (random ids, same batch shapes); "
                  f"achieved {steady:.1f} segments/s without model load = {steady / ceiling['segments_per_s']:.0%}")
        if "visual" in stages:
            ceil = visual_ceilings(manifest, params)
            achieved = report["stages"]["visual"]["throughput"]["frames_per_s"]
            bound = min(ceil["decode"]["frames_per_s"], ceil["encoder"]["frames_per_s"])
            report["stages"]["visual"]["ceiling"] = ceil
            print(f"visual    decode ceiling {ceil['decode']['frames_per_s']:.1f} frames/s "
                  f"({ceil['decode']['clips_per_s']:.2f} clips/s, decode + sample + face crop in the workers); "
                  f"encoder ceiling {ceil['encoder']['frames_per_s']:.1f} frames/s (random frames); "
                  f"achieved {achieved:.1f} frames/s = {achieved / bound:.0%} of the lower ceiling")
        if "acoustic" in stages and args.pyin_clips:
            subset = manifest.head(args.pyin_clips)
            rates = {}
            for f0 in ("yin", "pyin"):
                q = json.loads(json.dumps(params))
                q["features"]["acoustic"]["f0"] = f0
                meta = acoustic.run(subset, q, workdir / f"cache-{f0}", workdir / f"ac-{f0}.parquet", show_progress=False)
                rates[f0] = meta["throughput"]["media_s_per_s"]
            report["stages"]["acoustic"]["f0_media_s_per_s"] = rates
            print(f"acoustic  f0 on {len(subset)} clips: yin {rates['yin']:.1f} s media/s, pyin {rates['pyin']:.2f} "
                  f"s media/s (pyin {rates['yin'] / rates['pyin']:.0f}x slower)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("features", help="feature stages: throughput and ceilings",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--corpus", help="an existing corpus root (label.csv + Raw/); default: generate one")
    f.add_argument("--clips", type=int, default=90, help="clips to generate (MOSI: 2200)")
    f.add_argument("--size", default="320x240", help="generated frame size WxH (MOSI-like: 480x360)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", help="keep the generated corpus here (reused when it has --clips clips)")
    f.add_argument("--params", default="params.yaml")
    f.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. features.visual.fps=2")
    f.add_argument("--stages", default="text,visual,acoustic")
    f.add_argument("--cache", help="feature cache to use (default: a fresh temporary one, i.e. a cold run)")
    f.add_argument("--pyin-clips", type=int, default=10, help="clips timed with yin and pyin (0: skip)")
    f.add_argument("--json", help="also write the figures here")
    f.add_argument("--progress", action="store_true", help="show progress bars")
    f.set_defaults(run=features)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
