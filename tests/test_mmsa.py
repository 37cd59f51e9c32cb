"""MMSA / MulT feature pickles as a data source: safe loading, prepare's reasons, the feature stages,
export and re-import, and one `dvc repro` from a pickle to metrics.

The pickles are written here with the standard `pickle.dump`, as MMSA and MulT write theirs: MOSI,
MOSEI and CH-SIMS feature dims, aligned and unaligned, tens of rows, a few corrupt ones.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, write_fake_features
from pipeline.data import safe_pickle
from pipeline import schema
from pipeline.errors import guarded

DIMS = {"mosi": (768, 5, 20), "mosei": (768, 74, 35), "sims": (768, 33, 709)}  # text, audio, vision
STEPS = {"unaligned": (50, 60, 40), "aligned": (50, 50, 50)}  # small stand-ins for MMSA's (50, 500, 375)
SPLIT_SIZES = {"train": 24, "valid": 8, "test": 8}


def make_pickle(corpus="mosi", variant="unaligned", layout="mmsa", sizes=SPLIT_SIZES, seed=0) -> dict:
    """A feature pickle's content in MMSA's (or MulT's) layout; the label is the sum of one
    component per modality, each written into its features."""
    rng = np.random.default_rng(seed)
    (dt, da, dv), (lt, la, lv) = DIMS[corpus], STEPS[variant]
    scale = 1 / 3 if corpus == "sims" else 1.0
    data, k = {}, 0
    for split, n in sizes.items():
        parts = rng.uniform(-1, 1, (n, 3))
        n_text = rng.integers(3, lt + 1, n)
        n_audio, n_vision = (n_text, n_text) if variant == "aligned" else (rng.integers(1, la + 1, n), rng.integers(1, lv + 1, n))
        arrays = {}
        for key, (steps, dim, lengths, j) in {"text": (lt, dt, n_text, 0), "audio": (la, da, n_audio, 1),
                                              "vision": (lv, dv, n_vision, 2)}.items():
            x = np.zeros((n, steps, dim), np.float32)
            for i in range(n):
                where = slice(steps - lengths[i], steps) if layout == "mult" else slice(0, lengths[i])
                x[i, where] = rng.normal(0, 0.3, (lengths[i], dim)) + parts[i, j]
            arrays[key] = x
        labels = np.round(np.clip(parts.sum(1), -3, 3) * scale, 1).astype(np.float32)
        names = [f"v{(k + i) // 4}_x{(k + i) % 4}" for i in range(n)]
        k += n
        if layout == "mult":
            ids = np.array([[f"{v}_{i}".encode(), b"0", b"1"] for i, v in enumerate(names)], dtype="S32")
            data[split] = {**arrays, "labels": labels.reshape(n, 1, 1), "id": ids}
            continue
        text_bert = np.zeros((n, 3, lt), np.float32)
        for i in range(n):
            text_bert[i, 0, :n_text[i]] = rng.integers(1000, 30000, n_text[i])
            text_bert[i, 1, :n_text[i]] = 1
        data[split] = {"id": np.array([f"{v}$_${i}" for i, v in enumerate(names)], dtype=object),
                       "raw_text": np.array([f"it was {'good' if p > 0 else 'bad'}" for p in parts[:, 0]], dtype=object),
                       **arrays, "text_bert": text_bert, "regression_labels": labels,
                       "classification_labels": (np.sign(labels) + 1).astype(np.float32),
                       "annotations": np.array([("Negative", "Neutral", "Positive")[int(np.sign(v)) + 1] for v in labels], dtype=object)}
        if variant == "unaligned":
            data[split].update(audio_lengths=n_audio.tolist(), vision_lengths=n_vision.tolist())
        if corpus == "sims":
            for j, x in enumerate("TAV"):
                data[split][f"regression_labels_{x}"] = np.round(parts[:, j], 1).astype(np.float32)
    return data


def corrupt(data: dict, corpus="mosi", layout="mmsa") -> dict[str, str]:
    """Damage a few train rows as real files are damaged; returns {where: reject reason}."""
    train, lo_hi = data["train"], "[-1, 1]" if corpus == "sims" else "[-3, 3]"
    labels = train["labels"].reshape(-1) if layout == "mult" else train["regression_labels"]
    expected = {}
    labels[3], expected["train[3]"] = np.nan, "label is NaN"
    labels[4], expected["train[4]"] = 4.0, f"label 4 outside {lo_hi}"
    train["vision"][5] = np.nan
    expected["train[5]"] = "vision features wholly non-finite"
    train["audio"][6][train["audio"][6] != 0] = -np.inf  # real MOSI/MOSEI audio: -inf, set to 0, never rejected
    train["audio"][7, :, 0][train["audio"][7, :, 0] != 0] = -np.inf
    nonzero = np.argwhere(train["text"][8] != 0)[0]
    train["text"][8][tuple(nonzero)] = np.nan  # one NaN: set to 0 and counted
    if layout == "mult":
        train["id"][2, 0] = train["id"][0, 0]
        train["id"][9, 0] = b"noseparator"
        expected["train[9]"] = "id 'noseparator' is not <video_id>_<clip_id>"
    else:
        train["id"][2] = train["id"][0]
        train["id"][9] = "noseparator"
        expected["train[9]"] = "id 'noseparator' is not <video_id>$_$<clip_id>"
        if "audio_lengths" in train:
            train["audio_lengths"][1] = train["audio"].shape[1] + 5
            expected["train[1]"] = f"audio_lengths {train['audio'].shape[1] + 5} beyond the array's {train['audio'].shape[1]} steps"
    expected["train[2]"] = "duplicate id (first at train[0])"
    return expected


def write(path: Path, data: dict, protocol: int = 4) -> Path:
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=protocol)
    return path


def project(tmp_path: Path, pickle_path: Path, *assignments: str) -> Path:
    """A working folder with params.yaml reading the pickle (stages run from there, as DVC runs them)."""
    from pipeline import params

    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for a in (f"data.root={pickle_path}", "data.format=mmsa", "model.epochs=2", *assignments):
        params.assign(raw, a)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path


def run_stages(stages=("prepare", "text", "visual", "acoustic", "assemble")) -> list[int]:
    """The DAG's stage entry points in-process, with the paths dvc.yaml gives them ('train@<model>' too)."""
    from pipeline.features.runner import stage_main

    codes = []
    for stage in stages:
        if stage in schema.REGISTRY:
            module = importlib.import_module(f"pipeline.features.{stage}")
            codes.append(stage_main(stage, module, ["features/manifest.parquet", f"features/{stage}.parquet"]))
            continue
        script = importlib.import_module(f"stages.{stage.split('@')[0]}")
        args = {"prepare": ("features/manifest.parquet", "features/rejects.csv"),
                "assemble": ("features/manifest.parquet", "features", "features/dataset")}.get(stage)
        model = stage.partition("@")[2]
        codes.append(guarded(stage, script.main, *(args or (model, "features/dataset", f"models/{model}"))))
    return codes


# --------------------------------------------------------------------------- safe loading

@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_loading_gives_the_arrays_and_leaves_large_ones_in_the_file(tmp_path, protocol):
    data = make_pickle("sims", sizes={"train": 6, "valid": 2, "test": 2})
    loaded = safe_pickle.load(write(tmp_path / "f.pkl", data, protocol))
    for split, values in data.items():
        for key, value in values.items():
            got = loaded[split][key]
            if isinstance(value, np.ndarray) and value.dtype != object and value.nbytes >= safe_pickle.LAZY_BYTES:
                assert isinstance(got, safe_pickle.FileArray), (key, type(got))  # protocol 2: via a spill file
            assert np.array_equal(np.asarray(got), np.asarray(value), equal_nan=value.dtype.kind == "f") \
                if isinstance(value, np.ndarray) and value.dtype != object else list(got) == list(value), key


def test_dump_writes_what_standard_pickle_and_the_safe_loader_read(tmp_path):
    data = make_pickle("mosei", sizes={"train": 4, "valid": 2, "test": 2})
    data["train"]["lazy"] = safe_pickle.load(write(tmp_path / "src.pkl", data))["train"]["text"]  # a FileArray
    safe_pickle.dump(data, tmp_path / "out.pkl")
    with open(tmp_path / "out.pkl", "rb") as f:
        plain = pickle.load(f)
    safe = safe_pickle.load(tmp_path / "out.pkl")
    for got in (plain, safe):
        assert np.array_equal(np.asarray(got["train"]["lazy"]), data["train"]["text"])
        assert np.array_equal(np.asarray(got["valid"]["audio"]), data["valid"]["audio"])
        assert list(got["test"]["raw_text"]) == list(data["test"]["raw_text"])
    assert b"numpy.core.multiarray\n_reconstruct" in (tmp_path / "out.pkl").read_bytes()[:4096]  # numpy 1.x reads it


class _Payload:
    """Unpickling this would run `command`."""

    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("call, global_name", [(os.system, "posix.system"), (exec, "builtins.exec"),
                                               (subprocess.getoutput, "subprocess.getoutput")])
def test_a_malicious_pickle_is_refused_before_it_runs(tmp_path, call, global_name):
    marker = tmp_path / "marker"
    argument = f"open({str(marker)!r}, 'w').write('pwned')" if call is exec else f"touch {marker}"
    data = make_pickle("mosi", sizes={"train": 3, "valid": 1, "test": 1})
    data["test"]["annotations"] = [_Payload(call, argument)]  # deep inside, after the large arrays
    path = write(tmp_path / "evil.pkl", data)
    with pytest.raises(safe_pickle.UnsafePickle, match=f"refers to the global {global_name}, which a feature pickle "
                                                       "may not use .* nothing was run"):
        safe_pickle.load(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # the file really is malicious: the standard loader runs it
        pickle.load(f)
    assert marker.exists()


def test_prepare_refuses_a_malicious_pickle_in_one_line(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    data = make_pickle("mosi", sizes={"train": 3, "valid": 1, "test": 1})
    data["train"]["id"] = _Payload(os.system, f"touch {marker}")
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "evil.pkl", data)))
    assert run_stages(["prepare"]) == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "refers to the global posix.system" in err[0] and not marker.exists()


# --------------------------------------------------------------------------- prepare + stages

CASES = [("mosi", "unaligned", "mmsa"), ("mosi", "aligned", "mmsa"), ("mosei", "unaligned", "mmsa"),
         ("sims", "unaligned", "mmsa"), ("mosi", "unaligned", "mult")]


@pytest.mark.parametrize("corpus, variant, layout", CASES, ids=["-".join(c) for c in CASES])
def test_a_pickle_through_the_stages_to_metrics(tmp_path, monkeypatch, capsys, corpus, variant, layout):
    data = make_pickle(corpus, variant, layout)
    expected = corrupt(data, corpus, layout)
    path = write(tmp_path / "corpus.pkl", data)
    preset = "sims" if corpus == "sims" else corpus
    monkeypatch.chdir(project(tmp_path, path, f"data.preset={preset}"))
    assert run_stages() == [0] * 5
    out = capsys.readouterr().out

    rejects = pd.read_csv("features/rejects.csv")
    assert dict(zip(rejects["path"], rejects["reason"])) == expected
    manifest = pd.read_parquet("features/manifest.parquet")
    assert len(manifest) == sum(SPLIT_SIZES.values()) - len(expected)
    assert {"train[6]", "train[7]", "train[8]"} <= {f"{s}[{r}]" for s, r in zip(manifest["pickle_split"], manifest["pickle_row"])}
    assert "audio: " in out and "-inf values set to 0 (as MMSA's loader does) in 2 rows" in out
    assert "text: 1 NaN/+inf values set to 0 in 1 rows" in out
    assert f"NOT the standard {preset} sizes" in out
    assert ("no published sums exist for MulT/CMU pickles" if layout == "mult" else "matches none of the sums") in out

    # each table holds exactly the pickle's valid steps, -inf and NaN as 0
    train = data["train"]
    for stage, key in (("text", "text"), ("visual", "vision"), ("acoustic", "audio")):
        table, m = pd.read_parquet(f"features/{stage}.parquet").set_index("id"), schema.get(stage)
        for row in (0, 6, 8, 10):
            sid = manifest[(manifest["pickle_split"] == "train") & (manifest["pickle_row"] == row)]["id"].iloc[0]
            raw, n = np.nan_to_num(train[key][row], nan=0.0, neginf=0.0), int(table.loc[sid, m.length])
            steps = raw[len(raw) - n:] if layout == "mult" else raw[:n]
            assert np.array_equal(np.asarray(table.loc[sid, m.sequence]).reshape(n, -1), steps), (stage, row)
            assert row == 6 and key == "audio" or np.all(np.abs(steps).sum(-1) > 0)  # no padding counted as steps
    if layout == "mmsa" and corpus == "sims":
        assert manifest["label_T"].notna().all()

    dataset = json.loads(Path("features/dataset/meta.json").read_text())
    assert dataset["conventions"]["metrics"] == ("sims" if corpus == "sims" else "mosi")
    assert run_stages(["train@late_fusion"]) == [0]
    metrics = json.loads(Path("models/late_fusion/metrics.json").read_text())["test"]
    keys = {"mae", "corr", "acc2", "acc3", "acc5", "f1"} if corpus == "sims" else \
        {"mae", "corr", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0", "acc5", "acc7"}
    assert set(metrics) == keys


def test_split_sizes_and_the_published_sha256_are_checked(tmp_path, monkeypatch, capsys):
    from pipeline import presets

    data = make_pickle("mosi", sizes=presets.PRESETS["mosi"].split_sizes)
    for split in data.values():  # tiny features: the split sizes are what is tested
        for key, n in (("text", 4), ("audio", 3), ("vision", 3)):
            split[key] = split[key][:, :n, :3].copy()
        split["text_bert"] = split["text_bert"][:, :, :4].copy()
        split["audio_lengths"] = np.minimum(split["audio_lengths"], 3).tolist()
        split["vision_lengths"] = np.minimum(split["vision_lengths"], 3).tolist()
    path = write(tmp_path / "unaligned_50.pkl", data)
    from pipeline.cache import file_sha256

    monkeypatch.setitem(presets.PUBLISHED_SHA256, file_sha256(path), "MOSI/Processed/unaligned_50.pkl")
    monkeypatch.chdir(project(tmp_path, path))
    assert run_stages(["prepare"]) == [0]
    out = capsys.readouterr().out
    assert "splits 1284/229/686 (train/valid/test), the standard mosi sizes" in out
    assert "matches MMSA's published sum of MOSI/Processed/unaligned_50.pkl" in out


def test_unusable_pickles_end_in_one_line(tmp_path, monkeypatch, capsys):
    data = make_pickle("mosi", sizes={"train": 4, "valid": 2, "test": 2})
    data["valid"]["audio"] = data["valid"]["audio"][:1]
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "short.pkl", data)))
    assert run_stages(["prepare"]) == [2]
    assert capsys.readouterr().err.strip().endswith("valid/audio has 1 rows but valid has 2 labels")
    (tmp_path / "short.pkl").write_bytes(b"\x80\x04not a pickle at all")
    assert run_stages(["prepare"]) == [2]
    assert "not a readable feature pickle" in capsys.readouterr().err


def test_text_source_encoder_re_encodes_the_transcripts(tmp_path, monkeypatch, capsys):
    data = make_pickle("mosi", sizes={"train": 6, "valid": 2, "test": 2})
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "c.pkl", data), "features.text.source=encoder"))
    assert run_stages(["prepare", "text"]) == [0, 0]
    meta = schema.read_meta("features/text.parquet")
    assert meta["dim"] == 384 and meta["encoder"]["name"] == "minilm" and "source" not in meta["encoder"]
    mult = make_pickle("mosi", layout="mult", sizes={"train": 6, "valid": 2, "test": 2})
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "m.pkl", mult), "features.text.source=encoder"))
    capsys.readouterr()
    assert run_stages(["prepare", "text"]) == [0, 2]
    assert "MulT/CMU pickle holds no transcripts" in capsys.readouterr().err


# --------------------------------------------------------------------------- export

def _assembled(folder: Path) -> dict[str, np.ndarray]:
    with np.load(folder / "norm.npz") as norm:
        return {**{p.name: np.load(p) for p in sorted(folder.glob("*.npy"))}, **{f"norm:{k}": norm[k] for k in norm.files}}


def test_export_then_import_gives_the_same_assembled_arrays(tmp_path, monkeypatch, capsys):
    """pickle -> stages -> export -> the exported pickle -> stages: identical model inputs."""
    from pipeline.data.export import main as export_main

    data = make_pickle("sims")
    corrupt(data, "sims")
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "source.pkl", data), "data.preset=sims"))
    assert run_stages() == [0] * 5
    first = _assembled(tmp_path / "features" / "dataset")
    first_index = pd.read_parquet("features/dataset/index.parquet")
    assert export_main(["mmsa", "--out", str(tmp_path / "exported.pkl")]) == 0
    assert "rows of the source were rejected by prepare: positions differ" in capsys.readouterr().out
    with open(tmp_path / "exported.pkl", "rb") as f:  # what MMSA's loader does
        exported = pickle.load(f)
    train = exported["train"]
    assert train["text"].dtype == np.float32 and train["text_bert"].shape[:2] == (len(train["id"]), 3)
    assert len(train["audio_lengths"]) == len(train["regression_labels_T"]) == len(train["id"]) == 24 - 6
    assert train["id"][0] == data["train"]["id"][0] and train["raw_text"][0] == data["train"]["raw_text"][0]

    shutil.move("features", "features-first")
    monkeypatch.chdir(project(tmp_path, tmp_path / "exported.pkl", "data.preset=sims"))
    assert run_stages() == [0] * 5
    second = _assembled(tmp_path / "features" / "dataset")
    assert first.keys() == second.keys() and len(first) >= 8
    for name in first:
        assert np.array_equal(first[name], second[name]), name
    second_index = pd.read_parquet("features/dataset/index.parquet")
    assert second_index["id"].tolist() == first_index["id"].tolist()
    assert np.allclose(second_index["label"], first_index["label"], atol=1e-6)  # MMSA stores float32 labels


def test_export_of_extracted_features_keeps_sequences_and_says_no_text_bert(tmp_path, monkeypatch, capsys):
    from pipeline.data.export import export_mmsa

    root = write_fake_features(tmp_path / "features", n=24)
    lines = export_mmsa(root / "manifest.parquet", root, tmp_path / "ours.pkl")
    assert any("no text_bert" in line for line in lines)
    exported = safe_pickle.load(tmp_path / "ours.pkl")
    assert "text_bert" not in exported["train"]
    manifest = pd.read_parquet(root / "manifest.parquet")
    visual = pd.read_parquet(root / "visual.parquet").set_index("id")
    train_ids = manifest[manifest["split"] == "train"]["id"].tolist()
    for i, sid in enumerate(train_ids[:5]):
        n = exported["train"]["vision_lengths"][i]
        steps = np.asarray(exported["train"]["vision"])[i]
        assert np.array_equal(steps[:n], np.asarray(visual.loc[sid, "emb"], np.float32).reshape(n, -1))
        assert not steps[n:].any()  # zero padding after the steps


# --------------------------------------------------------------------------- one dvc repro

def test_dvc_repro_on_a_pickle_to_metrics(tmp_path):
    """As a user runs it on their own unaligned_39.pkl: params set, `dvc repro`, `dvc metrics show`."""
    from test_pipeline_e2e import _run

    work = tmp_path / "project"
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if not f.startswith("raw/"):
            (work / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, work / f)
    data = make_pickle("sims")
    expected = corrupt(data, "sims")
    (work / "data").mkdir()
    write(work / "data" / "unaligned_39.pkl", data)
    # what this test is about is the pickle -> metrics path: no ablations, a 2-point robustness curve
    project(work, Path("data/unaligned_39.pkl"), "data.preset=sims", "evaluate.ablations={}",
            "robustness.rates=[0.0, 0.5]", "robustness.seeds=[0]", "robustness.snr_db=[10.0]")
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"],
           "PYTHONPATH": str(work), "MSA_CACHE_DIR": str(tmp_path / "cache"), "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        _run(args, work, env)
    log = _run(["dvc", "repro"], work, env)
    assert f"{len(expected)} rejected" in log and "-inf values set to 0" in log
    for model in ("gexsent", "gce", "text_only", "late_fusion"):
        metrics = json.loads((work / "models" / model / "metrics.json").read_text())
        assert {"acc2", "acc3", "acc5", "f1", "mae", "corr"} == set(metrics["test"]), model
    shown = _run(["dvc", "metrics", "show"], work, env)
    assert "metrics/acc2.json" in shown and "metrics/acc2_has0.json" not in shown  # CH-SIMS's Acc-2, not MOSI's
    assert "Running stage" not in _run(["dvc", "repro"], work, env)


# --------------------------------------------------------------------------- real-world files: ids, widths, layouts

def _mosei_video(rng) -> str:
    """A YouTube-style id, '_' and '-' included (as CMU-MOSEI's are: 'Xg3_hkS0vOq')."""
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choice(list(chars), 3)) + "_" + "".join(rng.choice(list(chars + "-"), 7))


@pytest.mark.parametrize("style", ["mosei-str", "mosei-bytes", "mosi"])
def test_mult_ids_in_both_styles_give_the_right_videos(tmp_path, monkeypatch, capsys, style):
    """MulT/CMU MOSEI rows are [video_id, start, end] (the video id holds '_'); MOSI's first column is
    '<video>_<clip>'. Either way every row is kept, with its own video, so the leakage guard sees speakers."""
    rng = np.random.default_rng(1)
    data = make_pickle("mosei", layout="mult", sizes={"train": 12, "valid": 4, "test": 4})
    expected = {}
    for s, split in data.items():
        n = len(split["labels"])
        videos = [_mosei_video(rng) for _ in range(n // 4)]
        rows = []
        for i in range(n):
            video, start = videos[i // 4], 10.0 * (i % 4) + 0.25
            if style == "mosi":
                rows.append([f"{video}_{i % 4}".encode(), b"0", b"1"])
                expected[f"{s}[{i}]"] = (video, str(i % 4))
            else:
                rows.append([video, f"{start:.2f}", f"{start + 7.5:.2f}"])
                expected[f"{s}[{i}]"] = (video, f"{start:.2f}-{start + 7.5:.2f}")
        split["id"] = np.array(rows, dtype="S32" if style != "mosei-str" else "U32")
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "mult.pkl", data), "data.preset=mosei"))
    assert run_stages(["prepare"]) == [0]
    assert pd.read_csv("features/rejects.csv").empty
    manifest = pd.read_parquet("features/manifest.parquet")
    got = {f"{s}[{r}]": (v, c) for s, r, v, c in zip(manifest["pickle_split"], manifest["pickle_row"],
                                                       manifest["video_id"], manifest["clip_id"])}
    assert got == expected
    assert ("[video_id, start, end] rows" in capsys.readouterr().out) == (style != "mosi")
    # a speaker in two splits: the guard sees it (with the ids cut at '_' it saw 'Xg3' everywhere, or nothing)
    video = expected["train[0]"][0]
    data["valid"]["id"][0] = [f"{video}_9", "0", "1"] if style == "mosi" else [video, "90.00", "95.00"]
    write(tmp_path / "mult.pkl", data)
    assert run_stages(["prepare", "text", "visual", "acoustic", "assemble"])[-1] == 2
    assert "appears in splits train and valid" in capsys.readouterr().err


@pytest.mark.parametrize("width", [40, 19])
def test_a_split_of_another_width_ends_in_one_line(tmp_path, monkeypatch, capsys, width):
    data = make_pickle("mosi", sizes={"train": 6, "valid": 2, "test": 2})
    data["valid"]["vision"] = np.zeros((2, 40, width), np.float32)
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "w.pkl", data)))
    assert run_stages(["prepare"]) == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith(f"valid/vision is {width} wide but train/vision is 20: every split "
                                             f"needs the same feature width"), err


def _no_text(data: dict) -> None:
    for split in data.values():
        split.pop("text")
        split.pop("text_bert")


BROKEN = {  # what is wrong -> (change the pickle's content, the one line prepare ends with)
    "an empty split": (lambda d: d.update(test={k: v[:0] for k, v in d["test"].items()}), "test has no rows"),
    "a ragged per-row list": (lambda d: d["train"].update(audio=[np.zeros((3 + i, 5), np.float32) for i in range(6)]),
                              "train/audio is a list of 6 per-row arrays of differing shapes"),
    "no labels in a split": (lambda d: d["valid"].pop("regression_labels"), "valid has no regression_labels"),
    "modalities differ": (lambda d: d["test"].pop("audio"), "train has audio but test has none"),
}


@pytest.mark.parametrize("what", list(BROKEN))
def test_a_broken_pickle_ends_in_one_line(tmp_path, monkeypatch, capsys, what):
    data = make_pickle("mosi", sizes={"train": 6, "valid": 2, "test": 2})
    change, message = BROKEN[what]
    change(data)
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "b.pkl", data)))
    assert run_stages(["prepare"]) == [2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_a_pickle_without_text_trains_without_it_and_text_only_says_why_not(tmp_path, monkeypatch, capsys):
    data = make_pickle("mosi", sizes={"train": 12, "valid": 4, "test": 4})
    _no_text(data)
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "nt.pkl", data)))
    assert run_stages() == [0] * 5
    out = capsys.readouterr().out
    assert "text: skipped: no media for this stage in 20 segments [the pickle holds no text: 20]" in out
    assert "assemble: text     skipped: the pickle holds no text" in out
    assert run_stages(["train@late_fusion", "train@text_only"]) == [0, 2]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "text_only reads text, which features/dataset holds no features of (it has visual, " \
                               "acoustic)" in err[0], err


def mmsa_aligned(n: int, steps: int = 12, rng=None) -> dict:
    """One split of an aligned MMSA file as its preprocessing lays it out: text is BERT over [CLS] words [SEP];
    audio and vision are on those token steps, zero under [CLS], [SEP] and the padding; no *_lengths."""
    rng = rng or np.random.default_rng(0)
    words = rng.integers(2, steps - 2, n)
    text, audio, vision = (np.zeros((n, steps, d), np.float32) for d in (768, 5, 20))
    text_bert = np.zeros((n, 3, steps), np.float32)
    for i, k in enumerate(words):
        text[i, :k + 2] = rng.normal(size=(k + 2, 768))
        text_bert[i, 0, :k + 2], text_bert[i, 1, :k + 2] = rng.integers(1000, 3000, k + 2), 1
        audio[i, 1:k + 1] = rng.normal(size=(k, 5)) + 1
        vision[i, 1:k + 1] = rng.normal(size=(k, 20)) + 1
    labels = rng.uniform(-3, 3, n).round(1).astype(np.float32)
    return {"id": np.array([f"a{i}{rng.integers(99)}$_${i}" for i in range(n)], dtype=object),
            "raw_text": np.array(["it was ok"] * n, dtype=object), "text": text, "text_bert": text_bert,
            "audio": audio, "vision": vision, "regression_labels": labels}


def test_an_aligned_mmsa_file_keeps_audio_and_vision_on_the_token_steps(tmp_path, monkeypatch, capsys):
    rng = np.random.default_rng(0)
    data = {s: mmsa_aligned(n, rng=rng) for s, n in (("train", 8), ("valid", 3), ("test", 3))}
    for s, split in data.items():
        split["id"] = np.array([f"{s}{i}$_${i}" for i in range(len(split["id"]))], dtype=object)
    monkeypatch.chdir(project(tmp_path, write(tmp_path / "aligned_50.pkl", data)))
    assert run_stages(["prepare", "text", "visual", "acoustic"]) == [0] * 4
    assert "aligned: audio and vision on text's token steps" in capsys.readouterr().out
    manifest = pd.read_parquet("features/manifest.parquet")
    for stage, key in (("visual", "vision"), ("acoustic", "audio")):
        table, m = pd.read_parquet(f"features/{stage}.parquet").set_index("id"), schema.get(stage)
        for sid, s, r in zip(manifest["id"], manifest["pickle_split"], manifest["pickle_row"]):
            n = int(data[s]["text_bert"][r, 1].sum())  # [CLS] + words + [SEP]
            got = np.asarray(table.loc[sid, m.sequence]).reshape(-1, data[s][key].shape[2])
            assert np.array_equal(got, data[s][key][r, :n]), (stage, sid)  # step j is token j's
    # without lengths and with other steps than text, which steps are real cannot be told: refused
    data["train"]["vision"] = np.zeros((8, 30, 20), np.float32)
    write(tmp_path / "aligned_50.pkl", data)
    assert run_stages(["prepare"]) == [2]
    assert "train has no vision_lengths, and its vision has 30 steps where text has 12" in capsys.readouterr().err


class _Py2Pickler(pickle._Pickler):
    """Writes byte strings as Python 2 did (BINSTRING), as a feature pickle made under Python 2 holds them."""
    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj):
        import struct

        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)
    dispatch[bytes] = save_bytes


@pytest.mark.parametrize("writer", ["python3 protocol 2", "python2"])
def test_a_protocol_2_pickle_is_not_read_whole(tmp_path, writer):
    import tracemalloc

    big = np.random.default_rng(0).normal(size=(64, 100, 300)).astype(np.float32)  # 7.7 MB, GloVe-like
    data = {"train": {"text": big, "labels": np.zeros((64, 1, 1), np.float32), "id": np.array([[b"v_1"]] * 64)}}
    path = tmp_path / "p2.pkl"
    with open(path, "wb") as f:
        (_Py2Pickler(f, protocol=2) if writer == "python2" else pickle.Pickler(f, protocol=2)).dump(data)
    with open(path, "rb") as f:
        assert np.array_equal(pickle.load(f, encoding="latin1")["train"]["text"], big)  # a valid pickle
    tracemalloc.start()
    loaded = safe_pickle.load(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert isinstance(loaded["train"]["text"], safe_pickle.FileArray)
    assert peak < big.nbytes / 4, f"peak {peak / 1e6:.1f} MB loading {big.nbytes / 1e6:.1f} MB of array"
    assert np.array_equal(np.asarray(loaded["train"]["text"]), big)
    assert np.array_equal(loaded["train"]["id"], data["train"]["id"])


def test_a_failed_dump_leaves_no_temp_file(tmp_path):
    class Failing:  # an array whose rows cannot all be produced (a full disk mid-export does the same)
        shape, dtype = (4, 1024), np.dtype(np.float32)

        def blocks(self):
            yield np.zeros((2, 1024), np.float32)
            raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left") as caught:
        safe_pickle.dump({"train": {"text": Failing()}}, tmp_path / "out.pkl")
    assert caught.value.filename == str(tmp_path / "out.pkl")
    assert list(tmp_path.iterdir()) == []
