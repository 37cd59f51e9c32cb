"""Make the registry's CUDA-only torchvision importable beside a CPU build of torch.

The package registry only carries CUDA builds of torchvision. Imported beside a
CPU torch, its C extension fails to register its operators and the import dies
with ``RuntimeError: operator torchvision::nms does not exist`` (which also
breaks ``import transformers`` and ``import open_clip``). We only need
torchvision's Python code (transforms, model definitions), never its CUDA ops,
so on exactly that error we declare the two missing operator schemas and import
again. Where torchvision imports normally this module does nothing.
"""
import sys

_LIBS = []  # keep the torch.library handles alive for the life of the process


def _declare_torchvision_ops():
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)


def ensure_torchvision():
    """Import torchvision, patching the CPU/CUDA mismatch if (and only if) needed."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: the code paths that need it say so themselves
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _declare_torchvision_ops()
    import torchvision  # noqa: F401,F811


ensure_torchvision()
