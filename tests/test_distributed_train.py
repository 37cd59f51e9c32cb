"""DDP: `torchrun --nproc_per_node 2 -m stages.train` on gloo (CPU) trains like one process on the global batch.

Per model, one process with batch 16 and two ranks with 8 each must give the same test predictions within
1e-5 (measured: at most 1e-7, float summation order; computing InfoNCE, the Gram matrices, grading or the
balance loss per rank shard instead moves them by 1e-2), the same best epoch, and for GCE the same guide
counts per epoch (grading decided on the global batch). Dropout is off here: each rank draws its own masks
(rank r > 0 from a stream seeded by (seed, r)), which the test checks by what each rank's stream draws after
training; at the default dropout, 1 and 2 ranks agree within the seed spread
(`python -m tools.bench_train ddp`, docs/models.md). One torchrun job trains every case (one interpreter
start-up), each through `stages.train`.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import REPO, write_fake_features
from pipeline.training.dataset import assemble
from pipeline.training.train import train_model

TRAIN = {"epochs": 3, "patience": 10, "batch_size": 16, "lr": 0.003, "seed": 0, "device": "cpu"}
SMALL_GCE = {"visual_d_model": 8, "acoustic_d_model": 8, "encoder_layers": 1, "encoder_heads": 2, "encoder_ff_dim": 16,
             "utterance_dim": 8, "pair_dim": 8, "fusion_dim": 16, "head_hidden": 16, "relation_dim": 8,
             "contrastive_dim": 8, "dropout": 0.0, "grading_ratio": 0.95}  # a loose ratio: the relation loss fires
CASES = {  # case -> (model, its params section, model.* overrides)
    "gce": ("gce", {**SMALL_GCE, "grading": "sample"}, {}),  # per-sample guides: fire on these data whatever the order
    "gce_reference": ("gce", {**SMALL_GCE, "variant": "reference", "encoder_ff_dim": 16}, {}),  # filter unused in some steps
    # the published recipe: Adam, one 128-row batch per epoch (all 48 rows), a plateau schedule on rank 0's score
    "gce_published": ("gce", {**SMALL_GCE, "variant": "reference", "encoder_ff_dim": 16, "recipe": "published"}, {}),
    "gexsent": ("gexsent", {"d_model": 16, "n_experts": 4, "expert_hidden": 16, "n_heads": 2, "head_hidden": 16,
                            "dropout": 0.0, "balance_weight": 1.0}, {}),  # a balance loss strong enough to matter
    "text_only": ("text_only", {"dropout": 0.0}, {}),
    "late_fusion": ("late_fusion", {"dropout": 0.0}, {}),
    "text_finetune": ("late_fusion", {"dropout": 0.0}, {"text_finetune": True, "lr_text": 0.001}),  # BERT pooler unused
}
# at the default dropout the ranks' masks differ, so these train (alike on every rank) but not like one process
DROPOUT_CASES = {"gce_dropout": ("gce", {**SMALL_GCE, "dropout": 0.1, "grading": "sample"}, {})}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bert(folder):
    """A 1-layer, 8-wide BERT with its tokenizer, saved like a local Hugging Face folder (no dropout)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefgh"]) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                        max_position_embeddings=16, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = write_fake_features(tmp_path_factory.mktemp("ddp"), n=96)
    assemble(root / "manifest.parquet", {m: root / f"{m}.parquet" for m in ("text", "visual", "acoustic")}, root / "dataset")
    meta = json.loads((root / "dataset" / "meta.json").read_text())  # fine-tuning reloads the encoder by name
    meta["modalities"]["text"]["encoder"]["name"] = str(_tiny_bert(root / "bert"))
    (root / "dataset" / "meta.json").write_text(json.dumps(meta))
    return root / "dataset"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, dataset):
    """Every case trained by one `torchrun --nproc_per_node 2` (one interpreter start-up for all), each through
    `stages.train` in its own project folder -> {case: folder}, plus the run's output."""
    root = tmp_path_factory.mktemp("two_ranks")
    folders = {}
    for case, (name, arch, overrides) in {**CASES, **DROPOUT_CASES}.items():
        work = folders[case] = root / case
        (work / "features").mkdir(parents=True)
        shutil.copytree(dataset, work / "features" / "dataset")
        (work / "params.yaml").write_text(yaml.safe_dump({"model": {**TRAIN, **overrides}, name: arch}))
    driver = ("import json, os, sys\nimport torch\nimport torch.distributed as dist\nfrom pipeline.errors import guarded\n"
              "from stages import train\n"
              "dist.init_process_group('gloo')  # one group for every case: the stage joins it\n"
              "for folder, name in zip(sys.argv[1::2], sys.argv[2::2]):\n"
              "    os.chdir(folder)\n"
              "    code = guarded('train', train.main, name, 'features/dataset', 'out')\n"
              "    rank = dist.get_rank()  # a file per rank: the ranks' stdout pipes interleave mid-line\n"
              "    record = {'exit': code, 'draws': torch.rand(4).tolist()}\n"
              "    open(os.path.join(folder, f'rank{rank}.json'), 'w').write(json.dumps(record))\n"
              "dist.destroy_process_group()\n")
    (root / "cases.py").write_text(driver)
    args = [a for case, (name, _, _) in {**CASES, **DROPOUT_CASES}.items() for a in (str(folders[case]), name)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", str(_free_port()), str(root / "cases.py"), *args],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return folders, run.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_train_like_one_process(tmp_path, dataset, two_ranks, case):
    name, arch, overrides = CASES[case]
    single = train_model(name, dataset, tmp_path / "single", {**TRAIN, **overrides}, arch, progress=False)
    folders, stdout = two_ranks
    work = folders[case]
    ranks = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["exit"] for r in ranks] == [0, 0]  # both ranks finished the case
    assert ranks[0]["draws"] != ranks[1]["draws"]  # each rank its own random stream (dropout masks)
    assert stdout.count(f"{name}: ") and stdout.count("world size 2") == len(CASES) + len(DROPOUT_CASES)  # rank 0 logs

    ddp = json.loads((work / "out" / "metrics.json").read_text())
    assert ddp["best_epoch"] == single["best_epoch"]
    a = pd.read_csv(tmp_path / "single" / "plots" / "test_predictions.csv")
    b = pd.read_csv(work / "out" / "plots" / "test_predictions.csv")
    assert (a["id"] == b["id"]).all()
    np.testing.assert_allclose(b["pred"], a["pred"], atol=1e-5)
    if name == "gce":
        guides = [json.loads((d / "interpret" / "guides.json").read_text()) for d in (tmp_path / "single", work / "out")]
        fired = [row["relation_batches"] for row in guides[0]]
        assert guides[0] == guides[1] and max(fired) > 0
        if case == "gce_reference":  # steps without a guide leave its filter unused: DDP must cope
            assert min(fired) < 1
    assert not list((work / "out").glob("**/*.tmp"))


def test_two_ranks_train_with_dropout(two_ranks):
    """GCE's graders run dropout on each rank's own rows and their predictions are gathered: every rank then grades
    the global batch alike (graders on the gathered rows would draw rank-dependent masks, pick different guides
    on each rank, and DDP's collectives would no longer match)."""
    folders, stdout = two_ranks
    work = folders["gce_dropout"]
    assert [json.loads((work / f"rank{r}.json").read_text())["exit"] for r in (0, 1)] == [0, 0]
    guides = json.loads((work / "out" / "interpret" / "guides.json").read_text())
    assert max(row["relation_batches"] for row in guides) > 0  # grading chose guides: the relation loss ran
    assert np.isfinite(pd.read_csv(work / "out" / "plots" / "test_predictions.csv")["pred"]).all()
