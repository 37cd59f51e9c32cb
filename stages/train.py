"""Stage `train@<model>`: train one model and test the checkpoint chosen on validation.

    python -m stages.train gce                          (what `dvc repro train@gce` runs)
    torchrun --nproc_per_node 2 -m stages.train gce     (DDP; or set model.launch in params.yaml)

Reads features/dataset/ and params `model` (shared) + `<model>` (architecture);
writes models/<model>/model.pt, metrics.json, plots/ and live/ (dvclive).
"""
import sys

from pipeline.config import load_params
from pipeline.models import MODELS
from pipeline.train import NonFiniteLoss, train_model


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in MODELS:
        print(f"usage: python -m stages.train {{{','.join(MODELS)}}}", file=sys.stderr)
        return 2
    name = argv[0]
    params = load_params()
    try:
        result = train_model(name, "features/dataset", f"models/{name}", params["model"], params.get(name) or {},
                             text_encoder=params["features"]["text"]["encoder"])
    except NonFiniteLoss as err:
        print(f"train: {err}", file=sys.stderr)
        return 1
    test = result["test"]
    print(f"{name}: test " + ", ".join(f"{k} {v:.4f}" for k, v in test.items() if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
