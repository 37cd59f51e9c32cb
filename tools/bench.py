"""Benchmarks. One subcommand per part of the pipeline: `features` and `train`.

    python -m tools.bench features                          # 90-clip demo corpus, params.yaml as is
    python -m tools.bench features --clips 2200 --size 480x360 \\
        --set features.text.encoder=modernbert-base --set features.visual.encoder=clip-vit-b-32
    python -m tools.bench features --corpus raw/demo --set features.visual.encoder=random:clip-vit-b-32
    python -m tools.bench features --rss-sizes 200 2000     # + peak memory at two corpus sizes
    python -m tools.bench train                             # MOSI-sized synthetic features, every model
    python -m tools.bench pickle                            # MOSEI-sized MMSA pickle through `dvc repro`, peak RSS

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

With --rss-sizes, the same stages then run once per size on a generated corpus of
that many clips, each in a fresh process (peak RSS only ever rises within one
process), and it prints the peak RSS of the stage process, of its largest worker and
of its whole process tree (sampled), and whether the peak grows with the corpus. Pick
sizes well above the encoders' batch sizes (64): a corpus that never fills a batch
has a lower peak for that reason alone.

`pickle` writes a synthetic MMSA pickle of CMU-MOSEI's size (22,856 segments, 16326/1871/4659;
text 768-d, audio 74-d, vision 35-d, 50 steps each: 4.0 GB), streamed so the writer stays small,
runs the DAG on it up to every trained model and the probe (`dvc repro train probe`; data.format mmsa,
preset mosei, one epoch per model) in a
throw-away git + DVC copy of the project, and prints the peak RSS (VmHWM) of every stage process.

`train` writes MOSI-sized feature tables (2,199 segments, 1,284 train; text 768-d x
~30 tokens as ModernBERT-base, visual 512-d x ~30 frames as CLIP ViT-B-32, acoustic
46-d x ~128 steps; all options), assembles them with the pipeline's `assemble`, and
trains each model for a few epochs with the training loop's own pieces (the same
batches, loss, AdamW, clipping, bf16 autocast on CUDA). It prints samples/s, step
time, seconds per epoch (training pass + validation pass, as `train_model` runs
them), the part of the step spent building batches, and on CUDA the peak GPU memory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _corpus(args, workdir: Path) -> Path:
    if args.corpus:
        return Path(args.corpus)
    out = Path(args.out) if args.out else workdir / "corpus"
    if (out / "label.csv").is_file() and sum(1 for _ in open(out / "label.csv")) - 1 == args.clips:
        print(f"corpus: reusing {out} ({args.clips} clips)")
        return out
    return _generate(out, args.clips, args.size, args.seed)


def _generate(out: Path, clips: int, size: str, seed: int) -> Path:
    from tools.demo import generate_corpus

    t = time.perf_counter()
    width, height = (int(v) for v in size.lower().split("x"))
    generate_corpus(out, clips, seed=seed, size=(width, height), jobs=max(1, os.cpu_count() or 1))
    print(f"corpus: generated {clips} clips ({size}) in {out} in {time.perf_counter() - t:.1f} s")
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


def text_ceiling(manifest, cfg) -> dict:
    """The encoder alone on random token ids, in the corpus's own (length-sorted) batch shapes."""
    import torch

    from pipeline.features.encoders import load_text_encoder, pick_device, resolve_text_encoder
    from pipeline.features.text import encode, tokenize

    device = pick_device(cfg.device)
    tokenizer, model = load_text_encoder(resolve_text_encoder(cfg.encoder), device)
    texts = sorted(set(manifest["text"].astype(str)))
    ids, _ = tokenize(tokenizer, texts, cfg.max_length, cfg.lowercase)
    lengths = np.sort([len(x) for x in ids])
    bs = cfg.batch_size
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(5, tokenizer.vocab_size, (len(lengths[i:i + bs]), int(lengths[i:i + bs].max())), generator=g)
               for i in range(0, len(lengths), bs)]
    seconds = _timed_batches(lambda b: encode(model, b.to(device), torch.ones_like(b).to(device), cfg.layers, device), batches)
    return {"segments_per_s": len(lengths) / seconds, "tokens_per_s": float(lengths.sum()) / seconds, "segments": len(lengths)}


def visual_ceilings(manifest, cfg, compute) -> dict:
    """Decode-only (the same workers, no encoder) and encoder-only (random frames) throughput."""
    import torch

    from pipeline.features.compute import parallel_map
    from pipeline.features.encoders import load_image_encoder, pick_device, resolve_image_encoder
    from pipeline.features import visual

    device = pick_device(cfg.device)
    encoder = load_image_encoder(resolve_image_encoder(cfg.encoder, cfg.pretrained), device)
    settings = visual.settings_from(cfg)
    threads = 0 if compute.workers <= 1 else max(1, (os.cpu_count() or 1) // compute.workers)
    plan = visual.plan_rows(manifest, ("bench",), settings, threads)
    units = [{**u, "image_size": encoder.image_size} for u in plan.units.values()]
    t, frames, media_s = time.perf_counter(), 0, 0.0
    for _, clip, error, _ in parallel_map(visual.decode_clip, units, compute):
        if error is None:
            frames += len(clip["pixels"])
            media_s += clip["media_s"]
    decode_s = time.perf_counter() - t
    bs = cfg.batch_size
    n_batches = max(3, min(20, frames // bs))
    pixels = torch.randint(0, 256, (bs, encoder.image_size, encoder.image_size, 3), dtype=torch.uint8)
    encode_s = _timed_batches(encoder, [pixels] * n_batches)
    return {"decode": {"clips_per_s": len(units) / decode_s, "frames_per_s": frames / decode_s,
                       "media_s_per_s": media_s / decode_s},
            "encoder": {"frames_per_s": n_batches * bs / encode_s}}


def _params(args) -> dict:
    """params.yaml with the --set overrides applied, as plain data."""
    from pipeline import params

    raw = params.load(args.params)
    for assignment in args.set or []:
        params.assign(raw, assignment)
    return raw


def _stage_configs(raw: dict) -> tuple[dict, object]:
    """Each feature stage's typed params, and the compute section."""
    from pipeline import params
    from pipeline.features.compute import Compute
    from pipeline.features import acoustic, text, visual  # noqa: F401  (registers their sections)

    return {m: params.read(raw, params.SECTIONS[f"features.{m}"]) for m in ("text", "visual", "acoustic")}, \
        params.read(raw, Compute)


def _run_stages(args, manifest, configs: dict, compute, cache: Path, workdir: Path, report: dict) -> float:
    """Each stage cold, in turn; prints and records per-stage throughput. Returns the total wall time."""
    import importlib

    total = 0.0
    for name in args.stages.split(","):
        module = importlib.import_module(f"pipeline.features.{name}")
        t = time.perf_counter()
        meta = module.run(manifest, configs[name], cache, workdir / f"{name}.parquet", compute=compute,
                          show_progress=args.progress)
        wall = time.perf_counter() - t
        total += wall
        tp = meta["throughput"]
        report["stages"][name] = {"wall_s": wall, "throughput": tp, "encoder": meta["encoder"],
                                  "ok": meta["counts"]["ok"], "failed": meta["counts"]["failed"],
                                  "peak_rss_mb_so_far": _own_peak_rss_mb()}  # the process peak only rises
        unit = "tokens" if name == "text" else ("analysis steps" if name == "acoustic" else "frames")
        print(f"{name:9s} {wall:7.1f} s  {tp.get('clips_per_s', 0):8.2f} clips/s  {tp.get('frames_per_s', 0):9.1f} "
              f"{unit}/s  {tp.get('media_s_per_s', 0):7.1f} s media/s  ({meta['counts']['ok']} ok, "
              f"{meta['counts']['failed']} failed; encoder {meta['encoder'].get('id')})")
    return total


def _ceilings(args, manifest, configs: dict, compute, workdir: Path, report: dict) -> None:
    """Same-run ceilings (encoder-only, decode-only) and the yin/pyin comparison."""
    import dataclasses

    from pipeline.features import acoustic

    stages = args.stages.split(",")
    if "text" in stages and not args.no_ceilings:
        ceiling = text_ceiling(manifest, configs["text"])
        tp = report["stages"]["text"]["throughput"]
        steady = tp["clips"] / max(1e-9, tp["extract_s"] - tp.get("load_s", 0))
        report["stages"]["text"]["ceiling"] = ceiling
        print(f"text      encoder ceiling {ceiling['segments_per_s']:.1f} segments/s (random ids, same batch shapes); "
              f"achieved {steady:.1f} segments/s without model load = {steady / ceiling['segments_per_s']:.0%}")
    if "visual" in stages and not args.no_ceilings:
        ceil = visual_ceilings(manifest, configs["visual"], compute)
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
            cfg = dataclasses.replace(configs["acoustic"], extractor="librosa", f0=f0)
            meta = acoustic.run(subset, cfg, workdir / f"cache-{f0}", workdir / f"ac-{f0}.parquet", compute=compute,
                                show_progress=False)
            rates[f0] = meta["throughput"]["media_s_per_s"]
        report["stages"]["acoustic"]["f0_media_s_per_s"] = rates
        print(f"acoustic  f0 on {len(subset)} clips: yin {rates['yin']:.1f} s media/s, pyin {rates['pyin']:.2f} "
              f"s media/s (pyin {rates['yin'] / rates['pyin']:.0f}x slower)")


def features(args) -> int:
    from pipeline.data.prepare import build_manifest

    raw = _params(args)
    configs, compute = _stage_configs(raw)
    with tempfile.TemporaryDirectory(prefix="msa-bench-") as tmp:
        workdir = Path(tmp)
        root = _corpus(args, workdir)
        manifest, rejects = build_manifest({**raw.get("data", {}), "root": str(root)}, progress=False)
        media_s = float(manifest["duration"].sum())
        print(f"manifest: {len(manifest)} segments, {media_s / 60:.1f} min of media, {len(rejects)} rejected; "
              f"compute {compute}; cpu cores {os.cpu_count()}")
        cache = Path(args.cache) if args.cache else workdir / "cache"
        report: dict = {"segments": len(manifest), "media_s": media_s, "stages": {}, "params": raw.get("features")}
        total = _run_stages(args, manifest, configs, compute, cache, workdir, report)
        print(f"all {len(report['stages'])} stages: {total:.1f} s for {len(manifest)} clips ({media_s / 60:.1f} min of media)")
        report["total_s"] = total
        report["peak_rss_mb"] = _own_peak_rss_mb()
        print(f"peak RSS of this process so far: {report['peak_rss_mb']:.0f} MiB (workers not included)")
        _ceilings(args, manifest, configs, compute, workdir, report)
        if args.rss_sizes:
            report["rss"] = rss_by_corpus_size(args, workdir)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=float))
    return 0


# --------------------------------------------------------------------------- memory

def _own_peak_rss_mb() -> float:
    """This process's peak RSS. Linux: VmHWM, because getrusage's ru_maxrss survives exec, so a
    child started by a big parent (this benchmark's own --rss-sizes runs) would report the parent's."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def _hwm_mb(pid: int) -> float:
    """A process's own peak RSS so far (VmHWM: catches peaks between samples), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def run_sampling_rss(cmd: list[str], interval: float = 0.1, peaks: dict | None = None,
                     **popen) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run cmd; return it, the peak summed RSS (MiB) of its process tree, and the largest peak RSS of
    any one process under it (a worker), sampled every `interval` seconds. With `peaks`, also fill
    {pid: [command line, its peak RSS in MiB (VmHWM)]} for every process seen in the tree."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
    tree_peak, worker_peak = 0, 0
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # never block on a full pipe
    reader.start()
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        total = 0
        try:
            tree = [root] + root.children(recursive=True)
        except psutil.Error:
            tree = []
        for p in tree:
            try:
                rss = p.memory_info().rss
            except psutil.Error:  # exited between listing and reading
                continue
            total += rss
            if p is not root:
                worker_peak = max(worker_peak, rss)
            if peaks is not None:
                try:
                    seen = peaks.setdefault(p.pid, [" ".join(p.cmdline()), 0.0])
                except psutil.Error:
                    continue
                seen[1] = max(seen[1], _hwm_mb(p.pid))
        tree_peak = max(tree_peak, total)
        time.sleep(interval)
    reader.join()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines)), tree_peak / 2**20, worker_peak / 2**20


def rss_by_corpus_size(args, workdir: Path) -> list[dict]:
    """The stages, cold, on generated corpora of each size, each in a fresh process; peak RSS of each run."""
    rows = []
    for clips in args.rss_sizes:
        root = _generate(workdir / f"corpus-{clips}", clips, args.size, args.seed)
        out = workdir / f"rss-{clips}.json"
        cmd = [sys.executable, "-m", "tools.bench", "features", "--corpus", str(root), "--params", args.params,
               "--stages", args.stages, "--pyin-clips", "0", "--no-ceilings", "--json", str(out)]
        for assignment in args.set or []:
            cmd += ["--set", assignment]
        done, tree_peak, worker_peak = run_sampling_rss(cmd)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}")
        child = json.loads(out.read_text())
        after = {name: round(stage["peak_rss_mb_so_far"]) for name, stage in child["stages"].items()}
        rows.append({"clips": clips, "wall_s": child["total_s"], "stage_process_peak_mb": child["peak_rss_mb"],
                     "worker_peak_mb": worker_peak, "tree_peak_mb": tree_peak, "stage_process_peak_after_mb": after})
        print(f"rss       {clips:6d} clips: {child['total_s']:7.1f} s, peak RSS {child['peak_rss_mb']:6.0f} MiB stage "
              f"process, {worker_peak:6.0f} MiB largest worker, {tree_peak:6.0f} MiB whole tree (sampled); "
              f"stage process peak after " + ", ".join(f"{k} {v}" for k, v in after.items()))
    if len(rows) >= 2:
        small, big = rows[0], rows[-1]
        for what in ("stage_process_peak_mb", "worker_peak_mb", "tree_peak_mb"):
            if not small[what]:  # no workers (inline)
                continue
            change = big[what] / small[what] - 1
            print(f"rss       {what.replace('_mb', '').replace('_', ' ')}: {small[what]:.0f} -> {big[what]:.0f} MiB "
                  f"for {small['clips']} -> {big['clips']} clips ({change:+.0%}): "
                  + ("GROWS with the corpus" if change > 0.1 else "flat (within 10%)"))
    return rows


# --------------------------------------------------------------------------- a MOSEI-sized pickle through the DAG

MOSEI_SPLITS = {"train": 16326, "valid": 1871, "test": 4659}  # 22,856 segments
MOSEI_DIMS = {"text": 768, "audio": 74, "vision": 35}          # BERT, COVAREP, FACET


class SyntheticRows:
    """(N, steps, dim) float32: random where a row has steps (its length), zero after; made a block at a
    time, so safe_pickle.dump writes a 4 GB pickle holding one block in memory."""

    def __init__(self, lengths: np.ndarray, steps: int, dim: int, seed: int):
        self.lengths, self.seed = lengths, seed
        self.shape, self.dtype = (len(lengths), steps, dim), np.dtype(np.float32)

    def blocks(self):
        from pipeline.data.safe_pickle import block_rows

        step = block_rows(self)
        for k, start in enumerate(range(0, self.shape[0], step)):
            rows = min(step, self.shape[0] - start)
            block = np.random.default_rng([self.seed, k]).standard_normal((rows, *self.shape[1:]), dtype=np.float32)
            block[np.arange(self.shape[1])[None, :] >= self.lengths[start:start + rows, None]] = 0
            yield block


def write_mosei_pickle(path: Path, sizes: dict, dims: dict, steps: int, seed: int = 0) -> Path:
    """An MMSA-layout pickle of CMU-MOSEI's size and dims, every modality `steps` long (as aligned_50)."""
    from pipeline.data.safe_pickle import dump

    rng, data = np.random.default_rng(seed), {}
    for k, (split, n) in enumerate(sizes.items()):
        lengths = {key: rng.integers(max(1, steps // 5), steps + 1, n) for key in dims}
        mask = np.arange(steps)[None, :] < lengths["text"][:, None]
        text_bert = np.stack([np.where(mask, rng.integers(1000, 30000, (n, steps)), 0), mask, np.zeros_like(mask)], 1)
        labels = rng.uniform(-3, 3, n).round(1).astype(np.float32)
        data[split] = {"id": [f"s{k}v{i // 10}$_${i % 10}" for i in range(n)], "raw_text": ["a synthetic segment"] * n,
                       **{key: SyntheticRows(lengths[key], steps, dim, seed * 100 + 10 * k + j)
                          for j, (key, dim) in enumerate(dims.items())},
                       "text_bert": text_bert.astype(np.float32), "audio_lengths": lengths["audio"].tolist(),
                       "vision_lengths": lengths["vision"].tolist(), "regression_labels": labels,
                       "classification_labels": (np.sign(labels) + 1).astype(np.float32), "annotations": ["Neutral"] * n}
    dump(data, path)
    return path


def _dvc_project(workdir: Path, raw: dict) -> tuple[Path, dict]:
    """A git + DVC copy of this repository's tracked files (not the demo corpus) with these params."""
    import shutil

    import yaml

    repo, project = Path(__file__).resolve().parents[1], workdir / "project"
    files = subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not f.startswith("raw/"):
            (project / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / f, project / f)
    (project / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(project), "MSA_CACHE_DIR": str(workdir / "cache"), "GIT_AUTHOR_NAME": "bench",
           "GIT_AUTHOR_EMAIL": "bench@localhost", "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@localhost"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    return project, env


def pickle_dag(args) -> int:
    """Write the synthetic MOSEI pickle, `dvc repro` the whole DAG on it, print each stage's peak RSS."""
    import shutil

    from pipeline import params

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="msa-bench-pickle-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        sizes = {s: max(4, round(n * args.scale)) for s, n in MOSEI_SPLITS.items()}
        path = workdir / "mosei_synthetic.pkl"
        t = time.perf_counter()
        write_mosei_pickle(path, sizes, MOSEI_DIMS, args.steps, args.seed)
        print(f"pickle: {sum(sizes.values())} segments ({'/'.join(map(str, sizes.values()))}), dims "
              f"{MOSEI_DIMS}, {args.steps} steps: {path.stat().st_size / 1e9:.2f} GB written in "
              f"{time.perf_counter() - t:.0f} s, peak RSS of the writer {_own_peak_rss_mb():.0f} MiB")
        raw = params.load(args.params)
        for a in (f"data.root={path}", "data.format=mmsa", "data.preset=mosei", "model.epochs=1", *(args.set or [])):
            params.assign(raw, a)
        project, env = _dvc_project(workdir, raw)
        peaks: dict = {}
        t = time.perf_counter()
        # the data path up to every trained model and the probe; the evaluation stages (more seeds, ablations,
        # robustness) repeat training and scoring at the same per-process sizes
        done, tree_peak, _ = run_sampling_rss(["dvc", "repro", "train", "probe"], interval=0.2, peaks=peaks,
                                              cwd=project, env=env)
        wall = time.perf_counter() - t
        if done.returncode != 0:
            raise RuntimeError(f"dvc repro failed:\n{done.stdout[-3000:]}")
        by_stage: dict[str, float] = {}
        for cmdline, peak in peaks.values():
            words = cmdline.split()
            if "-m" in words and words[words.index("-m") + 1].startswith("stages."):
                stage = words[words.index("-m") + 1].split(".")[1]
                stage += f"@{words[words.index('-m') + 2]}" if stage == "train" else ""
                by_stage[stage] = max(by_stage.get(stage, 0.0), peak)
        for stage, peak in by_stage.items():
            print(f"dag       {stage:22s} peak RSS {peak:7.0f} MiB")
        limit = 4e9 / 2**20
        largest = max(by_stage.values())
        print(f"dag       `dvc repro` on {sum(sizes.values())} segments: {wall:.0f} s; largest stage process "
              f"{largest:.0f} MiB ({largest * 2**20 / 1e9:.2f} GB), whole tree {tree_peak:.0f} MiB (sampled): "
              + ("below 4 GB" if largest < limit else "ABOVE 4 GB"))
        if args.json:
            Path(args.json).write_text(json.dumps({"sizes": sizes, "steps": args.steps, "pickle_bytes": path.stat().st_size,
                                                   "wall_s": wall, "stage_peak_mb": by_stage, "tree_peak_mb": tree_peak}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


# --------------------------------------------------------------------------- training

def write_synthetic_features(root: Path, segments: int, n_train: int, n_valid: int, dims: dict, steps: dict,
                             seed: int = 0, labels: np.ndarray | None = None, signal: dict | None = None) -> Path:
    """Manifest + one Parquet per modality in the registry's contract (pipeline.schema), random numbers
    with each modality's dims and mean sequence length (0.5x to 1.5x, uniform). Labels are random unless
    given; signal[m] (segments,) is added to every step of modality m along a fixed random unit direction."""
    import pandas as pd

    from pipeline import schema
    from pipeline.features.table import list_array, write_feature_table

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    split = np.array(["train"] * n_train + ["valid"] * n_valid + ["test"] * (segments - n_train - n_valid))
    ids = [f"{split[i][:2]}{i // 20:04d}/{i % 20}" for i in range(segments)]  # no video in two splits
    pd.DataFrame({"id": ids, "video_id": [i.split("/")[0] for i in ids], "clip_id": [i.split("/")[1] for i in ids],
                  "split": split, "label": rng.uniform(-3, 3, segments).round(1) if labels is None else labels,
                  "label_name": "",
                  "text": "x"}).to_parquet(root / "manifest.parquet")
    for name, dim in dims.items():
        m = schema.get(name)
        lengths = rng.integers(max(1, steps[name] // 2), steps[name] * 3 // 2 + 1, segments)
        seqs = [rng.standard_normal((n, dim), dtype=np.float32) for n in lengths]
        if signal is not None and name in signal:
            direction = rng.standard_normal(dim).astype(np.float32)
            seqs = [s + np.float32(c) * direction / np.linalg.norm(direction) for s, c in zip(seqs, signal[name])]
        arrays = {"id": pa.array(ids, pa.string()), m.length: pa.array(lengths.astype(np.int32)),
                  m.sequence: list_array(seqs, np.float16)}
        if m.pooled:
            arrays[m.pooled] = list_array([s.mean(0) for s in seqs], np.float32)
        if m.token_ids:
            arrays[m.token_ids] = list_array([rng.integers(5, 30000, n).astype(np.int32) for n in lengths], np.int32)
        write_feature_table(root / f"{name}.parquet", arrays, {"stage": name, "dim": dim, "params": {},
                                                              "encoder": {"id": f"synthetic-{name}", "revision": "0"}})
    return root


def bench_model(name: str, data_dir: Path, cfg, arch: dict, device, epochs: int) -> dict:
    """Train `name` for `epochs` epochs the way train_model does; time every epoch after the first."""
    import torch

    from pipeline.training.dataset import AssembledData
    from pipeline.models import build_model, modalities_read
    from pipeline.models.blocks import task_loss
    from pipeline.training.train import _clip_groups, _lr_lambda, _to, clip_gradients, predict_rows

    torch.manual_seed(cfg.seed)
    data = AssembledData(data_dir, modalities=modalities_read(name, cfg.modalities))
    model = build_model(name, data.input_dims, data.task, 1, arch).to(device)
    train_rows, valid_rows = data.split_rows("train"), data.split_rows("valid")
    collate_s = [0.0]

    def collate(idx):
        t = time.perf_counter()
        batch = data.batch(train_rows[idx])
        collate_s[0] += time.perf_counter() - t
        return batch

    generator = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(range(len(train_rows)), batch_size=cfg.batch_size, shuffle=True,
                                         generator=generator, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(epochs * len(loader), cfg.warmup))
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timed = []
    for epoch in range(epochs):
        model.train()
        collate_s[0] = 0.0
        sync()
        t0 = time.perf_counter()
        for batch in loader:
            batch = _to(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
                out = model(batch)
            loss = task_loss(out["pred"], batch["label"], data.task) + sum(out.get("aux", {}).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(_clip_groups(model, "branches"), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
        loss.item()  # waits for the last step
        sync()
        t1 = time.perf_counter()
        predict_rows(model, data, valid_rows, device, cfg.eval_batch_size, False)
        sync()
        t2 = time.perf_counter()
        if epoch > 0 or epochs == 1:  # the first epoch pays one-off costs (allocator, kernel selection, page cache)
            timed.append({"train_s": t1 - t0, "valid_s": t2 - t1, "collate_s": collate_s[0]})
    mean = {k: float(np.mean([e[k] for e in timed])) for k in timed[0]}
    steps = len(loader)
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "steps_per_epoch": steps,
            "samples_per_s": len(train_rows) / mean["train_s"], "step_ms": 1000 * mean["train_s"] / steps,
            "batch_build_ms": 1000 * mean["collate_s"] / steps, "train_s": mean["train_s"],
            "valid_s": mean["valid_s"], "epoch_s": mean["train_s"] + mean["valid_s"], "epochs_timed": len(timed),
            "gpu_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}


def train(args) -> int:
    import torch

    from pipeline import params
    from pipeline.training.dataset import AssembledData, AssembleParams, assemble
    from pipeline.models import MODELS
    from pipeline.training.train import TrainParams, resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    raw = _params(args)
    params.assign(raw, f"model.device={args.device}")
    if args.batch_size:
        params.assign(raw, f"model.batch_size={args.batch_size}")
    cfg = params.read(raw, TrainParams)
    device = resolve_device(cfg.device)
    dims = {"text": args.text_dim, "visual": args.visual_dim, "acoustic": args.acoustic_dim}
    steps = {"text": args.text_steps, "visual": args.visual_steps, "acoustic": args.acoustic_steps}
    with tempfile.TemporaryDirectory(prefix="msa-bench-train-") as tmp:
        t = time.perf_counter()
        features = write_synthetic_features(Path(tmp) / "features", args.segments, args.train, args.valid, dims, steps,
                                            args.seed)
        meta = assemble(features / "manifest.parquet", {m: features / f"{m}.parquet" for m in dims},
                        Path(tmp) / "dataset", params.read(raw, AssembleParams))
        data = AssembledData(Path(tmp) / "dataset")
        shape = ", ".join(f"{m} {v['dim']}-d x {v['mean_len']:.0f} steps" for m, v in meta["modalities"].items())
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
        print(f"data: {args.segments} segments ({len(data.split_rows('train'))} train, "
              f"{len(data.split_rows('valid'))} valid), {shape} after assemble; built in {time.perf_counter() - t:.1f} s")
        print(f"device {device} ({gpu}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"batch {cfg.batch_size}, {args.epochs} epochs per model (first untimed)")
        results = []
        for name in args.models.split(","):
            arch = params.as_dict(params.parse(MODELS[name].config_class, raw.get(name), name))
            results.append(bench_model(name, Path(tmp) / "dataset", cfg, arch, device, args.epochs))
            r = results[-1]
            print(f"  {name}: {r['epoch_s']:.2f} s/epoch", flush=True)
    header = f"{'model':12s} {'params':>10s} {'samples/s':>10s} {'step ms':>8s} {'of which batch ms':>17s} " \
             f"{'train s':>8s} {'valid s':>8s} {'s/epoch':>8s} {'GPU peak MiB':>12s}"
    print(header)
    for r in results:
        peak = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "-"
        print(f"{r['model']:12s} {r['params']:10,d} {r['samples_per_s']:10.0f} {r['step_ms']:8.1f} "
              f"{r['batch_build_ms']:17.1f} {r['train_s']:8.2f} {r['valid_s']:8.2f} {r['epoch_s']:8.2f} {peak:>12s}")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "hardware": gpu, "segments": args.segments,
                                               "dims": dims, "steps": steps, "batch_size": cfg.batch_size,
                                               "models": results}, indent=1))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n\n")[0])
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
    f.add_argument("--no-ceilings", action="store_true", help="skip the decode-only and encoder-only ceilings")
    f.add_argument("--rss-sizes", type=int, nargs="+", metavar="CLIPS",
                   help="also measure peak RSS on generated corpora of these sizes, e.g. 200 2000")
    f.set_defaults(run=features)

    t = sub.add_parser("train", help="training: samples/s, step time, s/epoch, GPU memory peak",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--models", default="gce,gexsent,text_only,late_fusion")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda")
    t.add_argument("--epochs", type=int, default=3, help="per model; the first is not timed")
    t.add_argument("--batch-size", type=int, help="default: model.batch_size")
    t.add_argument("--segments", type=int, default=2199, help="MOSI: 2199 (MOSEI: ~23000)")
    t.add_argument("--train", type=int, default=1284, help="training segments (MOSI: 1284)")
    t.add_argument("--valid", type=int, default=229, help="validation segments (MOSI: 229)")
    t.add_argument("--text-dim", type=int, default=768, help="ModernBERT-base 768, MiniLM 384")
    t.add_argument("--visual-dim", type=int, default=512, help="CLIP ViT-B-32 512, EfficientNet-Lite0 1280")
    t.add_argument("--acoustic-dim", type=int, default=46)
    t.add_argument("--text-steps", type=int, default=30, help="mean tokens per segment")
    t.add_argument("--visual-steps", type=int, default=30, help="mean frames per segment")
    t.add_argument("--acoustic-steps", type=int, default=128, help="mean acoustic steps per segment")
    t.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: torch's choice; 1 is steadier on a shared, busy machine)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--params", default="params.yaml")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param, e.g. gce.fusion_dim=256")
    t.add_argument("--json", help="also write the figures here")
    t.set_defaults(run=train)

    k = sub.add_parser("pickle", help="a synthetic MOSEI-sized MMSA pickle through `dvc repro`: peak RSS per stage",
                       description=pickle_dag.__doc__)
    k.add_argument("--scale", type=float, default=1.0, help="fraction of MOSEI's 16326/1871/4659 segments")
    k.add_argument("--steps", type=int, default=50, help="steps of every modality (aligned_50: 50)")
    k.add_argument("--seed", type=int, default=0)
    k.add_argument("--workdir", help="keep the pickle and the project here (default: a temporary folder, removed)")
    k.add_argument("--params", default="params.yaml")
    k.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a param (default model.epochs=1)")
    k.add_argument("--json", help="also write the figures here")
    k.set_defaults(run=pickle_dag)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
