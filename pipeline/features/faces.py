"""Face detectors for the visual stage's crop: OpenCV's Haar cascade and MTCNN.

Both take an RGB frame and a detection size (the short side, in pixels, of the copy
the detector sees; 0 = the frame as decoded) and return the largest face as (centre
x, centre y, side) in full-frame pixels, or None. A face must span at least
1 / MIN_FACE_FRACTION of the short side: talking heads, not crowds.

    haar    OpenCV's bundled frontal-face cascade on an equalised grey copy: no extra
            dependency, frontal faces only, misses small or dim faces.
    mtcnn   the three-stage cascade of CNNs of Zhang et al. (2016) with the P/R/O-Net
            weights that facenet-pytorch ships inside its wheel (loaded from its data
            folder, offline; facenet-pytorch's own code is not imported: it pins an old
            torch and needs torchvision's compiled NMS). The networks and the pipeline
            below follow facenet-pytorch's `detect_face` (MIT), with NMS in numpy.
"""
from __future__ import annotations

import os

import numpy as np

MIN_FACE_FRACTION = 8
# Haar: pyramid step and neighbours that a detection needs (OpenCV's usual 1.1 / 4 were kept:
# they measured best on the real clips and the demo's cartoon heads)
HAAR_SCALE_STEP, HAAR_MIN_NEIGHBOURS = 1.1, 4
# MTCNN: score thresholds of P-, R-, O-Net and the pyramid factor (the reference values)
MTCNN_THRESHOLDS, MTCNN_FACTOR = (0.6, 0.7, 0.7), 0.709
DETECTORS = ("haar", "mtcnn")


def resized(rgb: np.ndarray, short_side: int) -> tuple[np.ndarray, float]:
    """The frame with its short side at most `short_side` (0 = as is), and the scale applied."""
    import cv2

    h, w = rgb.shape[:2]
    scale = min(1.0, short_side / min(h, w)) if short_side else 1.0
    if scale == 1.0:
        return rgb, 1.0
    return cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA), scale


def detect_face(rgb: np.ndarray, detector: str = "haar", short_side: int = 0) -> tuple[float, float, float] | None:
    """(centre x, centre y, side) of the largest face in full-frame pixels, or None."""
    small, scale = resized(rgb, short_side)
    boxes = haar_boxes(small) if detector == "haar" else mtcnn_boxes(small)
    if len(boxes) == 0:
        return None
    x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))[:4]
    return (x0 + x1) / 2 / scale, (y0 + y1) / 2 / scale, max(x1 - x0, y1 - y0) / scale


# --------------------------------------------------------------------------- Haar

_CASCADE = None


def haar_boxes(rgb: np.ndarray) -> list[tuple[float, float, float, float]]:
    """(x0, y0, x1, y1) of every face the cascade finds."""
    global _CASCADE
    import cv2

    if _CASCADE is None:
        _CASCADE = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
        if _CASCADE.empty():
            raise RuntimeError("OpenCV's bundled Haar cascade could not be loaded")
    grey = cv2.equalizeHist(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY))
    min_side = max(16, min(grey.shape) // MIN_FACE_FRACTION)
    faces = _CASCADE.detectMultiScale(grey, scaleFactor=HAAR_SCALE_STEP, minNeighbors=HAAR_MIN_NEIGHBOURS,
                                      minSize=(min_side, min_side))
    return [(x, y, x + w, y + h) for x, y, w, h in faces]


# --------------------------------------------------------------------------- MTCNN

def mtcnn_weights_dir() -> str:
    """facenet-pytorch's data folder, found without importing the package."""
    import importlib.util

    from ..errors import UserError

    spec = importlib.util.find_spec("facenet_pytorch")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data") if spec else ""
    if not os.path.isfile(os.path.join(folder, "onet.pt")):
        raise UserError("features.visual.face_detector: 'mtcnn' needs the MTCNN weights of facenet-pytorch "
                        "(pip install --no-deps facenet-pytorch==2.6.0; `make install` does)")
    return folder


def _nets():
    """P-, R- and O-Net (facenet-pytorch's layer names, so its state dicts load as they are)."""
    from torch import nn

    class Net(nn.Module):
        def __init__(self, convs: list[tuple], dense: list[tuple], heads: dict[str, int]):
            super().__init__()
            for i, (cin, cout, k, pool) in enumerate(convs, 1):
                self.add_module(f"conv{i}", nn.Conv2d(cin, cout, kernel_size=k))
                self.add_module(f"prelu{i}", nn.PReLU(cout))
                if pool:
                    self.add_module(f"pool{i}", nn.MaxPool2d(pool[0], pool[1], ceil_mode=True))
            self.n_convs = len(convs)
            for i, (fin, fout) in enumerate(dense, self.n_convs + 1):
                self.add_module(f"dense{i}", nn.Linear(fin, fout))
                self.add_module(f"prelu{i}", nn.PReLU(fout))
            self.heads = heads  # output name -> size, in the order returned
            last = dense[-1][1] if dense else convs[-1][1]
            for name, size in heads.items():
                self.add_module(name, nn.Linear(last, size) if dense else nn.Conv2d(last, size, kernel_size=1))

        def forward(self, x):
            for name, layer in self.named_children():
                if name in self.heads:
                    continue
                if name == f"dense{self.n_convs + 1}":  # TF-converted weights expect (N, W, H, C) flattening
                    x = x.permute(0, 3, 2, 1).reshape(len(x), -1)
                x = layer(x)
            return [getattr(self, name)(x) for name in self.heads]

    pnet = Net([(3, 10, 3, (2, 2)), (10, 16, 3, None), (16, 32, 3, None)], [], {"conv4_2": 4, "conv4_1": 2})
    rnet = Net([(3, 28, 3, (3, 2)), (28, 48, 3, (3, 2)), (48, 64, 2, None)], [(576, 128)],
               {"dense5_2": 4, "dense5_1": 2})
    onet = Net([(3, 32, 3, (3, 2)), (32, 64, 3, (3, 2)), (64, 64, 3, (2, 2)), (64, 128, 2, None)], [(1152, 256)],
               {"dense6_2": 4, "dense6_1": 2})
    return pnet, rnet, onet


_MTCNN = None


def _mtcnn():
    global _MTCNN
    if _MTCNN is None:
        import torch

        folder = mtcnn_weights_dir()
        nets = _nets()
        for net, name in zip(nets, ("pnet", "rnet", "onet")):
            state = torch.load(os.path.join(folder, f"{name}.pt"), map_location="cpu", weights_only=True)
            # O-Net's landmark head (dense6_3) is not used here
            net.load_state_dict({k: v for k, v in state.items() if not k.startswith("dense6_3")})
            net.eval()
        _MTCNN = nets
    return _MTCNN


def nms(boxes: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Indices kept by greedy non-maximum suppression on (x0, y0, x1, y1, score) rows."""
    x0, y0, x1, y1, score = boxes[:, :5].T
    area = (x1 - x0 + 1) * (y1 - y0 + 1)
    order, keep = np.argsort(score)[::-1], []
    while len(order):
        i, rest = order[0], order[1:]
        keep.append(i)
        w = np.maximum(0, np.minimum(x1[i], x1[rest]) - np.maximum(x0[i], x0[rest]) + 1)
        h = np.maximum(0, np.minimum(y1[i], y1[rest]) - np.maximum(y0[i], y0[rest]) + 1)
        inter = w * h
        overlap = inter / (np.minimum(area[i], area[rest]) if mode == "min" else area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, int)


def _square(boxes: np.ndarray) -> np.ndarray:
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    out = boxes.copy()
    out[:, 0] += (boxes[:, 2] - boxes[:, 0] - side) / 2
    out[:, 1] += (boxes[:, 3] - boxes[:, 1] - side) / 2
    out[:, 2:4] = out[:, :2] + side[:, None]
    return out


def _refine(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Box regression of R- and O-Net: corners move by reg x the box size (+1, pixel-inclusive)."""
    wh = np.tile(boxes[:, 2:4] - boxes[:, 0:2] + 1, 2)
    out = boxes.copy()
    out[:, :4] += reg * wh
    return out


def _net_input(images: list[np.ndarray]):
    """uint8 (H, W, 3) images of one size -> the (n, 3, H, W) float tensor the networks take."""
    import torch

    return (torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() - 127.5) * 0.0078125


def _patches(rgb: np.ndarray, boxes: np.ndarray, size: int):
    """Crops of the boxes (clipped to the frame), resized to size x size: the R-/O-Net input."""
    import cv2

    h, w = rgb.shape[:2]
    crops = []
    for x0, y0, x1, y1 in boxes[:, :4].astype(int):
        x0, y0, x1, y1 = max(x0, 1), max(y0, 1), min(x1, w), min(y1, h)
        crops.append(cv2.resize(rgb[y0 - 1:y1, x0 - 1:x1], (size, size), interpolation=cv2.INTER_AREA))
    return _net_input(crops)


def mtcnn_boxes(rgb: np.ndarray) -> np.ndarray:
    """(x0, y0, x1, y1, score) of every face MTCNN finds (P-Net pyramid -> R-Net -> O-Net)."""
    import cv2
    import torch

    pnet, rnet, onet = _mtcnn()
    h, w = rgb.shape[:2]
    min_face = max(12, min(h, w) // MIN_FACE_FRACTION)
    scale, found = 12.0 / min_face, []
    with torch.inference_mode():
        while min(h, w) * scale >= 12:   # stage 1: P-Net, fully convolutional, on each scale of the pyramid
            level = cv2.resize(rgb, (int(w * scale + 1), int(h * scale + 1)), interpolation=cv2.INTER_AREA)
            reg, logits = pnet(_net_input([level]))
            prob = torch.softmax(logits, 1)
            ys, xs = np.nonzero(prob[0, 1].numpy() >= MTCNN_THRESHOLDS[0])
            if len(ys):
                cells = np.stack([xs, ys], 1).astype(np.float64)
                boxes = np.concatenate([np.floor((2 * cells + 1) / scale), np.floor((2 * cells + 12) / scale),
                                        prob[0, 1].numpy()[ys, xs, None], reg[0].numpy()[:, ys, xs].T], 1)
                found.append(boxes[nms(boxes, 0.5)])
            scale *= MTCNN_FACTOR
        if not found:
            return np.zeros((0, 5))
        boxes = np.concatenate(found)
        boxes = boxes[nms(boxes, 0.7)]
        corners = boxes[:, :4] + boxes[:, 5:9] * np.tile(boxes[:, 2:4] - boxes[:, 0:2], 2)
        boxes = _square(np.concatenate([corners, boxes[:, 4:5]], 1))
        for net, size, threshold, mode in ((rnet, 24, MTCNN_THRESHOLDS[1], "union"),
                                           (onet, 48, MTCNN_THRESHOLDS[2], "min")):  # stages 2 and 3
            boxes = boxes[(np.minimum(boxes[:, 2], w) >= np.maximum(boxes[:, 0], 1))
                          & (np.minimum(boxes[:, 3], h) >= np.maximum(boxes[:, 1], 1))]  # some pixels in the frame
            if not len(boxes):
                return np.zeros((0, 5))
            reg, logits = net(_patches(rgb, boxes, size))
            reg, prob = reg.numpy(), torch.softmax(logits, 1).numpy()
            keep = prob[:, 1] > threshold
            boxes = np.concatenate([boxes[keep, :4], prob[keep, 1:2]], 1)
            reg = reg[keep]
            if size == 24:
                pick = nms(boxes, 0.7)
                boxes = _square(_refine(boxes[pick], reg[pick]))
            else:
                boxes = _refine(boxes, reg)
                boxes = boxes[nms(boxes, 0.7, mode)]
            if not len(boxes):
                return np.zeros((0, 5))
    side = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    return boxes[side >= min_face]
