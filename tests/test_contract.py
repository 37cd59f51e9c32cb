"""The declared contracts: typed params (one default each, one-line errors), the modality registry
(a fourth modality end to end), dvc.yaml deps = what each stage imports, the demo generator's defaults."""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import pipeline
from conftest import REPO, write_fake_features
from pipeline import params, schema
from pipeline.errors import ParamError, guarded

STAGES = ("check", "prepare", "text", "visual", "acoustic", "assemble", "train", "probe", "seeds", "ablation", "robustness", "report")


def _import_all():
    """Every pipeline module, so every @section is registered."""
    for info in pkgutil.walk_packages(pipeline.__path__, "pipeline."):
        importlib.import_module(info.name)


# --------------------------------------------------------------------------- params: one default each

def test_params_yaml_shows_the_defaults_of_every_section():
    _import_all()
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(params.SECTIONS) >= {"data", "cache", "compute", "features.text", "features.visual",
                                    "features.acoustic", "assemble", "model", "gexsent", "gce", "text_only", "late_fusion"}
    for name, cls in params.SECTIONS.items():
        written = params.lookup(raw, name)
        assert written is not None, f"params.yaml has no section {name}"
        assert params.as_dict(params.parse(cls, written, name)) == params.as_dict(cls()), name
        assert set(written) == {f.name for f in dataclasses.fields(cls)}, f"{name}: every param is shown"
    # and nothing in params.yaml belongs to no section
    def leaves(node, prefix=""):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if dotted in params.SECTIONS:
                continue
            assert isinstance(value, dict), f"params.yaml: {dotted} belongs to no section"
            yield from leaves(value, dotted + ".")
    list(leaves(raw))


def test_model_sections_are_the_models():
    from pipeline.models import MODELS

    for name, cls in MODELS.items():
        assert params.SECTIONS[name] is cls.config_class


# --------------------------------------------------------------------------- params: one-line errors, exit 2

BAD = [  # (section override, expected message): one per class of invalid value
    ("features.visual.fps=0", "features.visual.fps: 0 is not allowed (> 0)"),
    ("features.visual.fps=-1", "features.visual.fps: -1 is not allowed (> 0)"),
    ("features.visual.batch_size=0", "features.visual.batch_size: 0 is not allowed (>= 1)"),
    ("features.visual.max_frames=-1", "features.visual.max_frames: -1 is not allowed (>= 0)"),
    ("features.visual.fsp=3", "features.visual.fsp: unknown param (known: encoder, pretrained, fps,"),
    ("features.text.batch_size=0", "features.text.batch_size: 0 is not allowed (>= 1)"),
    ("features.acoustic.hop_ms=0", "features.acoustic.hop_ms: 0 is not allowed (> 0)"),
    ("features.acoustic.fmax=20", "features.acoustic.fmax: 20.0 is not allowed (> fmin (60))"),
    ("model.batch_size=0", "model.batch_size: 0 is not allowed (>= 1)"),
    ("model.lr=-1", "model.lr: -1 is not allowed (> 0)"),
    ("model.lr=abc", "model.lr: 'abc' is not a number"),
    ("model.epochs=0", "model.epochs: 0 is not allowed (>= 1)"),
    ("model.epochs=2.5", "model.epochs: 2.5 is not a whole number"),
    ("model.text_finetune=1", "model.text_finetune: 1 is not allowed (true | false)"),
    ("model.modalities=[text, smell]", "model.modalities: ['text', 'smell'] is not allowed"),
    ("model.launch=python; rm -rf /", "model.launch: 'python; rm -rf /' is not allowed"),
    ("assemble.max_steps.text=-2", "assemble.max_steps.text: -2 is not allowed (>= 0)"),
    ("compute.backend=spark", "compute.backend: 'spark' is not allowed (local | dask)"),
    ("gexsent.top_k=20", "gexsent.top_k: 20 is not allowed (<= n_experts (10))"),
    ("gexsent.variant=paper", "gexsent.variant: 'paper' is not allowed (reference | improved)"),
    ("gexsent.ablate=[attention]", "gexsent.ablate[0]: 'attention' is not allowed (experts | modality_gate | gated_attention)"),
    ("model.threads=-1", "model.threads: -1 is not allowed (>= 0)"),
]
STAGE_OF = {"features.visual": "visual", "features.text": "text", "features.acoustic": "acoustic",
            "model": "train", "assemble": "assemble", "compute": "visual", "gexsent": "train"}


def _project(tmp_path: Path, *assignments: str) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for a in assignments:
        params.assign(raw, a)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def _stage_call(stage: str):
    """(callable, args) running a stage's main in-process, as its `python -m stages.<stage>` would."""
    if stage in ("text", "visual", "acoustic"):
        from pipeline.features.runner import stage_main

        module = importlib.import_module(f"pipeline.features.{stage}")
        return lambda: stage_main(stage, module, ["features/manifest.parquet", f"features/{stage}.parquet"])
    script = importlib.import_module(f"stages.{stage}")
    args = {"train": ("gexsent", "features/dataset", "models/gexsent"),
            "assemble": ("features/manifest.parquet", "features", "features/dataset")}[stage]
    return lambda: guarded(stage, script.main, *args)


@pytest.mark.parametrize("assignment, message", BAD, ids=[a for a, _ in BAD])
def test_a_bad_value_ends_the_stage_with_one_line(tmp_path, monkeypatch, capsys, assignment, message):
    section = assignment.split("=")[0].rsplit(".", 1)[0].split(".max_steps")[0]
    stage = STAGE_OF[section]
    monkeypatch.chdir(_project(tmp_path, assignment))
    assert _stage_call(stage)() == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{stage}: {message}"), err


def test_launch_is_python_or_torchrun_with_flags_only():
    from pipeline.training.train import TrainParams

    for good in ("python", "python3", "torchrun --nproc_per_node 4",
                 "torchrun --nproc_per_node=4 --nnodes 2 --rdzv_endpoint head:29500"):
        assert params.parse(TrainParams, {"launch": good}, "model").launch == good
    for bad in ("torchrun --nproc_per_node 2 && curl x", "bash -c python", "python $(id)", "python -c 'import os'",
                "torchrun --nproc_per_node\nsh", "torchrun --nproc_per_node 2 `id`"):  # a newline: a second command
        with pytest.raises(ParamError, match="model.launch: .* is not allowed"):
            params.parse(TrainParams, {"launch": bad}, "model")


def test_a_missing_upstream_output_names_the_stage_to_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(_project(tmp_path))
    for stage, upstream in (("visual", "prepare"), ("assemble", "prepare"), ("train", "assemble")):
        assert _stage_call(stage)() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"run the `{upstream}` stage first" in err[0], err


# --------------------------------------------------------------------------- the check stage: before any output is removed

CHECK_ONLY = [  # what no single stage sees, but the check does
    ("modle.lr=0.1", "modle: unknown params section (known: assemble, cache,"),
    ("evaluate.models=[gce, gpt]", "evaluate.models[1]: 'gpt' is not allowed (gexsent | gce | text_only | late_fusion)"),
    ("evaluate.ablations={x: {model: gce, set: [gce.grading=never]}}",
     "evaluate.ablations.x (gce.grading=never): gce.grading: 'never' is not allowed"),
]


@pytest.mark.parametrize("assignment, message", BAD + CHECK_ONLY, ids=[a for a, _ in BAD + CHECK_ONLY])
def test_the_check_stops_every_bad_value_in_one_line_that_says_how_to_undo(tmp_path, monkeypatch, capsys, assignment,
                                                                          message):
    from stages import check

    monkeypatch.chdir(_project(tmp_path, assignment))
    assert guarded("check", check.main, "features/params.checked") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"check: {message}"), err
    assert "`git checkout params.yaml`" in err[0] and "--temp" in err[0]
    assert not (tmp_path / "features" / "params.checked").exists()


def test_a_passing_check_writes_the_same_bytes_for_any_valid_params(tmp_path, monkeypatch):
    """Its output is every other stage's dependency: if its bytes followed the params, passing would re-run them all."""
    from stages import check

    written = []
    for i, assignment in enumerate(["model.lr=0.001", "model.lr=0.0001", "features.visual.fps=5"]):
        (tmp_path / str(i)).mkdir()
        monkeypatch.chdir(_project(tmp_path / str(i), assignment))
        assert guarded("check", check.main, "features/params.checked") == 0
        written.append((tmp_path / str(i) / "features" / "params.checked").read_bytes())
    assert written[0] == written[1] == written[2] and written[0]


def test_the_check_knows_every_params_section():
    """stages/check.py imports each module that declares a section; a new section's module must be added there."""
    _import_all()
    listed = subprocess.run([sys.executable, "-c", "import stages.check, pipeline.params as p; print(sorted(p.SECTIONS))"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert listed == str(sorted(params.SECTIONS))


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_waits_for_the_params_check():
    stages = _dvc_stages()
    (marker,) = stages["check"]["outs"]
    assert stages["check"]["params"] == [{"params.yaml": None}]  # all of it, whatever section is added
    for name, stage in stages.items():
        if name != "check":
            assert marker in stage.get("do", stage)["deps"], name


def test_every_output_is_in_git_or_in_dvc_cache():
    """`dvc exp run --temp` and the queue run in a fresh copy of the last commit: an output that is neither
    versioned in git nor in DVC's cache is missing there, so its stage (feature extraction, training) would re-run."""
    for name, stage in _dvc_stages().items():
        stage = stage.get("do", stage)
        for kind in ("outs", "metrics", "plots"):
            for out in stage.get(kind, []):
                path, opts = next(iter(out.items())) if isinstance(out, dict) else (out, {})
                if (opts or {}).get("cache", True) is False:
                    path = path.replace("${item}", "gce")
                    ignored = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0
                    assert not ignored, f"{name}: {path} is cache: false and gitignored: neither git nor DVC keeps it"


def test_the_real_command_line_exits_2_with_one_line(tmp_path):
    """The same, through `python -m stages.visual` as DVC runs it: no traceback."""
    _project(tmp_path, "features.visual.fps=0")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.visual", "features/manifest.parquet", "features/visual.parquet"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip() == "visual: features.visual.fps: 0 is not allowed (> 0)"


def test_predict_arguments_fail_in_one_line(tmp_path, capsys):
    from pipeline.predict import main

    assert main(["--text", "fine", "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no trained model at" in err[0]


# --------------------------------------------------------------------------- dvc.yaml deps = imports

def _module_file(name: str) -> Path | None:
    for path in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Our modules imported anywhere in a file (lazy imports inside functions included)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    out = set()
    for name in found:
        if name.split(".")[0] == "pipeline":
            parts = name.split(".")
            out.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if _module_file(".".join(parts[:i])))
    return out


def _closure(module: str) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(_module_file(name), name)
    return {str(_module_file(m).relative_to(REPO)) for m in seen}


def test_dvc_deps_are_exactly_the_code_each_stage_imports():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        spec = stages[stage].get("do", stages[stage])
        deps = [d for d in spec["deps"] if d.startswith(("pipeline", "stages"))]
        covered = set()
        for dep in deps:
            path = REPO / dep
            covered |= {str(p.relative_to(REPO)) for p in path.rglob("*.py")} if path.is_dir() else {dep}
        imported = _closure(f"stages.{stage}")
        assert imported - covered == set(), f"{stage}: imports not in its deps"
        assert covered - imported == set(), f"{stage}: deps it does not import"


# --------------------------------------------------------------------------- a fourth modality

@pytest.fixture
def speech_modality():
    """A speech-encoder modality declared the way a contributor would: one registry entry."""
    schema.register(schema.Modality("speech", sequence="emb", length="n_frames", ordered=False))
    yield schema.get("speech")
    schema.unregister("speech")


@pytest.mark.parametrize("model", ["late_fusion", "gexsent", "gce"])
def test_a_fourth_modality_through_the_registry(tmp_path, speech_modality, model):
    from pipeline.training.dataset import AssembledData, assemble
    from pipeline.training.train import train_model

    dims = {"text": 8, "visual": 6, "acoustic": 5, "speech": 7}
    root = write_fake_features(tmp_path / "feat", n=48, dims=dims)
    meta = assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in schema.names()}, root / "dataset")
    assert meta["modalities"]["speech"]["dim"] == 7 and meta["modalities"]["speech"]["present"] == 48
    data = AssembledData(root / "dataset")
    batch = data.batch(np.arange(4))
    assert batch["speech"].shape[::2] == (4, 7) and batch["speech_mask"].any()
    cfg = {"epochs": 2, "patience": 5, "batch_size": 8, "modalities": ["text", "visual", "acoustic", "speech"]}
    result = train_model(model, root / "dataset", tmp_path / model, cfg, progress=False)
    assert result["test"]["mae"] is not None
    from pipeline.training.train import load_checkpoint

    trained, ckpt = load_checkpoint(tmp_path / model / "model.pt")
    assert ckpt["config"]["input_dims"]["speech"] == 7
    # speech reaches the prediction: scrambling it changes the output
    rows = data.split_rows("test")[:6]
    batch = data.batch(rows)
    batch.pop("label")
    import torch

    with torch.no_grad():
        before = trained(batch)["pred"]
        batch["speech"] = torch.randn_like(batch["speech"]) * 5
        after = trained(batch)["pred"]
    assert not torch.allclose(before, after)


# --------------------------------------------------------------------------- the demo corpus

def test_demo_defaults_reproduce_the_committed_corpus(tmp_path):
    from tools import demo

    committed = REPO / "raw" / "demo"
    if not (committed / "label.csv").is_file():
        pytest.skip("the demo corpus raw/demo is not committed")
    args = demo.parser().parse_args([])
    labels = pd.read_csv(committed / "label.csv", dtype={"clip_id": str})
    assert args.out == "raw/demo" and args.clips == len(labels) == 120 and args.seed == 0
    speakers, clips = demo.plan_corpus(args.clips, args.seed, args.speakers)
    demo.write_tables(tmp_path, clips)
    for name in ("label.csv", "components.csv"):
        assert (tmp_path / name).read_bytes() == (committed / name).read_bytes(), name
    by_id = {s.video_id: s for s in speakers}
    for index in (0, len(clips) - 1):  # the first and the last clip, byte for byte
        clip = clips[index]
        out = tmp_path / f"{index}.mp4"
        demo.write_clip(out, speaker=by_id[clip.video_id], s_face=clip.s_face, s_voice=clip.s_voice,
                        duration=clip.duration, size=args.size, fps=args.fps, seed=args.seed, index=clip.index)
        committed_clip = committed / "Raw" / clip.video_id / f"{clip.clip_id}.mp4"
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(committed_clip.read_bytes()).digest()


def test_feature_table_columns_come_from_the_registry():
    from pipeline.features import acoustic, text, visual

    assert set(text.columns("float16")) | {"id"} == set(schema.get("text").columns)
    assert set(visual.columns("float16")) | {"id"} == set(schema.get("visual").columns)
    assert set(acoustic.COLUMNS) | {"id"} == set(schema.get("acoustic").columns)
    json.dumps([dataclasses.asdict(m) for m in schema.REGISTRY.values()])  # plain data
