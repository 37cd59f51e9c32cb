"""Make the registry's CUDA-only torchvision importable beside a CPU build of torch.

The package registry only carries CUDA builds of torchvision. Imported beside a
CPU torch, its C extension fails to register its operators and the import dies
with ``RuntimeError: operator torchvision::nms does not exist`` (which also
breaks ``import transformers`` and ``import open_clip``). We only need
torchvision's Python code (transforms, model definitions), never its CUDA ops,
so on exactly that error we declare the two missing operator schemas and import
again. Where torchvision imports normally this module does nothing.

Lazily: importing torch + torchvision costs ~5 s, and `import pipeline` runs in
every joblib and Dask worker, most of which never touch torch (acoustic, decode).
So instead of importing torchvision here, we put a finder at the front of
``sys.meta_path`` that wraps torchvision's loader: the first ``import torchvision``
anywhere (transformers and open_clip included) runs through `_PatchingLoader`, and
the finder removes itself once torchvision is loaded. Nothing is imported until then.
"""
import importlib.abc
import sys

_LIBS = []  # keep the torch.library handles alive for the life of the process


def _declare_torchvision_ops():
    import torch

    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBS.append(lib)


def _forget_torchvision_submodules():
    """Drop the half-imported torchvision.* modules so the second attempt imports them afresh."""
    for name in [m for m in sys.modules if m.startswith("torchvision.")]:
        del sys.modules[name]


class _PatchingLoader(importlib.abc.Loader):
    """torchvision's own loader, plus one retry on the missing-operator error."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        try:
            self.loader.exec_module(module)
        except RuntimeError as err:
            if "torchvision::nms" not in str(err):
                raise
            _forget_torchvision_submodules()
            _declare_torchvision_ops()
            self.loader.exec_module(module)  # same module object: sys.modules["torchvision"] stays valid
        # loaded: from now on torchvision is an ordinary module with its own loader
        module.__loader__ = module.__spec__.loader = self.loader
        _uninstall()

    def __getattr__(self, name):  # get_resource_reader, get_data, ...: the real loader's
        return getattr(self.loader, name)


class _TorchvisionFinder(importlib.abc.MetaPathFinder):
    """Finds torchvision with the finders behind it, and hands back its spec with `_PatchingLoader`.

    Only consulted while torchvision is not in sys.modules. A bare `importlib.util.find_spec`
    (transformers' availability checks) gets the wrapped spec and imports nothing."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None  # not installed: the code paths that need it say so themselves


_FINDER = _TorchvisionFinder()


def _uninstall():
    if _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)


def install():
    """Route the first torchvision import through the patch; a no-op when it is already imported."""
    if "torchvision" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


install()
