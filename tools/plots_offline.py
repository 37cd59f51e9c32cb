"""Make `dvc plots show` / `dvc plots diff` pages work offline.

    python -m tools.plots_offline        (`make install` runs it; then `dvc plots diff` -> dvc_plots/index.html)

DVC's page loads Vega, Vega-Lite and Vega-Embed from a CDN, so its charts stay blank on an offline
machine. This writes an HTML template with the three libraries inline (the bundle that ships inside
the vl-convert-python wheel) to .dvc/tmp/plots-offline.html and points DVC at it in .dvc/config.local
(`plots.html_template`, local to this checkout, never committed). PNG plots (`models/<m>/interpret/*.png`,
`plots/`) need nothing. `--check` renders every Vega-Lite chart of an existing page to PNG with
vl-convert, offline, and fails on the first that does not render.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

TEMPLATE = "tmp/plots-offline.html"   # relative to .dvc/, as DVC resolves plots.html_template
VEGA_LITE = "5.21"                    # DVC's plot templates are Vega-Lite 5 specs
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Vega {vega}, Vega-Lite {vega_lite}, Vega-Embed {embed}: inline (vl-convert-python {vlc}), no CDN -->
    <script>
BUNDLE
    </script>
    <style>
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def template_html() -> str:
    """The page DVC fills in: its `{plot_divs}` placeholder and the libraries inline (no `{scripts}`: no CDN tags)."""
    import vl_convert as vlc
    from importlib.metadata import version

    bundle = vlc.javascript_bundle(vl_version=VEGA_LITE).replace("</script", "<\\/script")
    if "{plot_divs}" in bundle or "{scripts}" in bundle:  # DVC replaces these in the whole page
        raise RuntimeError("the Vega bundle contains a DVC template placeholder")
    head = PAGE.format(vega=vlc.get_vega_version(), vega_lite=VEGA_LITE, embed=vlc.get_vega_embed_version(),
                       vlc=version("vl-convert-python"))
    return head.replace("BUNDLE", bundle)


def install(repo: Path) -> Path:
    """Write the template under <repo>/.dvc and set plots.html_template in .dvc/config.local."""
    dvc_dir = repo / ".dvc"
    if not dvc_dir.is_dir():
        raise SystemExit(f"plots_offline: {repo} is not a DVC repository (no .dvc/)")
    path = dvc_dir / TEMPLATE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template_html(), encoding="utf-8")
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", TEMPLATE], cwd=repo, check=True)
    return path


def specs(page: Path) -> list[dict]:
    """The Vega-Lite specs DVC wrote into a plots page (`var spec = {...};` per chart)."""
    return [json.loads(m) for m in re.findall(r"var spec = (\{.*?\});\n", page.read_text(encoding="utf-8"), re.S)]


def check(page: Path) -> int:
    """Render every chart of `page` to PNG offline -> how many; raises on the first failure or a CDN script tag."""
    import vl_convert as vlc

    html = page.read_text(encoding="utf-8")
    remote = re.findall(r"<script[^>]+src=\"(https?://[^\"]+)\"", html)
    if remote:
        raise SystemExit(f"plots_offline: {page} loads {remote[0]}: run `python -m tools.plots_offline` first")
    charts = specs(page)
    for spec in charts:
        png = vlc.vegalite_to_png(spec, scale=1)
        if not png.startswith(b"\x89PNG"):
            raise SystemExit(f"plots_offline: a chart of {page} did not render")
    return len(charts)


def main(argv=None) -> int:
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("--repo", default=".", help="the repository to set up (default: here)")
    cli.add_argument("--check", metavar="PAGE", help="render every chart of this dvc_plots/index.html offline")
    args = cli.parse_args(argv)
    if args.check:
        print(f"plots_offline: {check(Path(args.check))} charts of {args.check} render offline")
        return 0
    path = install(Path(args.repo))
    print(f"plots_offline: `dvc plots show` / `dvc plots diff` pages now load Vega from {path} (offline)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
