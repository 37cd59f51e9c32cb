"""Encoder presets: packaged real weights load offline, hub presets fail with one clear error,
local folders / checkpoints and a Hugging Face cache resolve through the same path as hub models."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pipeline.features.encoders import (EncoderUnavailable, fingerprint, load_image_encoder, load_text_encoder, pick_device,
                               resolve_image_encoder, resolve_text_encoder)
from pipeline.features.text import encode, tokenize

CPU = torch.device("cpu")


@pytest.fixture
def offline_empty_hub(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache, whatever this machine has."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.mark.parametrize("name, offline_choice", [("modernbert-base", "'minilm'")])
def test_text_hub_preset_offline_is_one_clear_error(offline_empty_hub, name, offline_choice):
    with pytest.raises(EncoderUnavailable) as err:
        resolve_text_encoder(name)
    message = str(err.value)
    assert f"'{name}'" in message and "answerdotai/ModernBERT-base" in message and offline_choice in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["clip-vit-b-32", "clip-vit-l-14"])
def test_image_hub_presets_offline_are_one_clear_error(offline_empty_hub, name):
    with pytest.raises(EncoderUnavailable) as err:
        resolve_image_encoder(name)
    message = str(err.value)
    assert f"'{name}'" in message and "'efficientnet-lite0'" in message and "pretrained=openai" in message


def test_unknown_names_list_the_choices():
    with pytest.raises(EncoderUnavailable, match="minilm"):
        resolve_text_encoder("no-such-encoder")
    with pytest.raises(EncoderUnavailable, match="efficientnet-lite0"):
        resolve_image_encoder("no-such-encoder")
    with pytest.raises(EncoderUnavailable, match="not-a-tag"):
        resolve_image_encoder("ViT-B-32", pretrained="not-a-tag")


def test_minilm_packaged_weights_are_real(tmp_path):
    """all-MiniLM-L6-v2 from its package, offline: 384-d, and it knows what sentences mean."""
    spec = resolve_text_encoder("minilm")
    assert spec.id == "sentence-transformers/all-MiniLM-L6-v2" and len(spec.revision) == 64
    tokenizer, model = load_text_encoder(spec, pick_device("cpu"))
    sentences = ["I loved this movie, it was wonderful.", "What a great and enjoyable film.",
                 "The train to Boston leaves at noon on Tuesday."]
    ids, _ = tokenize(tokenizer, sentences, 64, False)
    pooled = []
    for seq in ids:
        states = encode(model, torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long), [-1], CPU)[0]
        v = states.mean(0).numpy()
        pooled.append(v / np.linalg.norm(v))
    assert pooled[0].shape == (384,)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.2


def test_efficientnet_lite0_packaged_weights_are_real():
    spec = resolve_image_encoder("efficientnet-lite0")
    encoder = load_image_encoder(spec, CPU)
    assert encoder.dim == 1280 and encoder.image_size == 224 and encoder.mean == encoder.std == (0.5, 0.5, 0.5)
    rng = np.random.default_rng(0)
    # a smooth picture, the same picture shifted by 4 px, and noise
    yy, xx = np.mgrid[0:232, 0:232]
    img = np.stack([128 + 100 * np.sin(xx / 15), 128 + 100 * np.cos(yy / 20), 128 + 60 * np.sin((xx + yy) / 25)], -1)
    batch = np.stack([img[:224, :224], img[4:228, 4:228], rng.integers(0, 255, (224, 224, 3))]).astype(np.uint8)
    emb = encoder(torch.from_numpy(batch)).numpy()
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert emb[0] @ emb[1] > 0.9 and emb[0] @ emb[1] > emb[0] @ emb[2] + 0.1
    # the packaged weights are loaded, not a random initialisation
    random_init = load_image_encoder(spec, CPU, weights=False)
    assert not np.allclose(random_init(torch.from_numpy(batch[:1])).numpy(), encoder(torch.from_numpy(batch[:1])).numpy())


def test_hub_id_resolves_from_the_local_cache(tmp_path, offline_empty_hub):
    """A hub id already in the Hugging Face cache loads offline, keyed by its commit."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = offline_empty_hub / "models--someorg--tiny-bert" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]))
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(snapshot)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(snapshot)
    (offline_empty_hub / "models--someorg--tiny-bert" / "refs").mkdir()
    (offline_empty_hub / "models--someorg--tiny-bert" / "refs" / "main").write_text(commit)
    spec = resolve_text_encoder("someorg/tiny-bert")
    assert spec.id == "someorg/tiny-bert" and spec.revision == commit
    tokenizer, model = load_text_encoder(spec, CPU)
    ids = tokenizer("good movie")["input_ids"]
    assert model.config.hidden_size == 16 and ids[0] == 2 and ids[-1] == 3   # [CLS] ... [SEP] of this vocabulary
    assert model(input_ids=torch.tensor([ids])).last_hidden_state.shape == (1, len(ids), 16)


def test_open_clip_name_plus_local_checkpoint(tmp_path):
    """An open_clip model name with `pretrained:` a local file, and the same weights as a local folder."""
    import open_clip

    cfg = {"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 16},
           "text_cfg": {"context_length": 8, "vocab_size": 32, "width": 8, "heads": 1, "layers": 1}}
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "test-tiny-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "configs")
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pt"
    torch.save(open_clip.model.CLIP(**cfg).state_dict(), ckpt)
    by_name = resolve_image_encoder("test-tiny-vit", pretrained=str(ckpt))
    assert by_name.kind == "open_clip" and by_name.revision == fingerprint(ckpt)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    shutil.copy(ckpt, folder / "open_clip_pytorch_model.bin")
    by_folder = resolve_image_encoder(str(folder))
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8))
    a = load_image_encoder(by_name, CPU)(pixels).numpy()
    b = load_image_encoder(by_folder, CPU)(pixels).numpy()
    assert a.shape == (2, 8) and np.allclose(a, b, atol=1e-5)
    with pytest.raises(EncoderUnavailable, match="pretrained"):
        resolve_image_encoder("test-tiny-vit")


def test_revision_follows_the_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text('{"a": 1}')
    before = fingerprint(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"a": 2}')   # a new vocabulary changes the token ids
    assert fingerprint(tmp_path) != before
