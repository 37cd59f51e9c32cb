"""The torchvision shim is lazy: `import pipeline` imports no torch, the first torchvision import is patched.

Each check runs in a fresh interpreter, since the shim acts on the first import of the process.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO


def run_python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_import_pipeline_imports_no_torch_and_torchvision_then_works():
    out = run_python("""
        import importlib.util, sys
        import pipeline
        from pipeline import _compat
        assert "torch" not in sys.modules and "torchvision" not in sys.modules, "import pipeline imported torch"
        assert sys.meta_path[0] is _compat._FINDER
        assert importlib.util.find_spec("torchvision") is not None   # a probe (as transformers does) ...
        assert "torch" not in sys.modules                            # ... imports nothing

        import open_clip                         # its own `import torchvision` is the first, patched one
        import transformers
        from transformers import AutoModel
        from torchvision import transforms
        import torchvision
        assert torchvision.ops is not None and transforms.Resize is not None
        assert _compat._FINDER not in sys.meta_path, "the finder stays after torchvision loaded"
        assert not isinstance(torchvision.__loader__, _compat._PatchingLoader)

        _compat.install()                        # torchvision already imported: does nothing
        assert _compat._FINDER not in sys.meta_path
        print("ok")
    """)
    assert out.strip().endswith("ok")
