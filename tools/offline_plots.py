"""Make `dvc plots show` render without a network: an HTML template with Vega inlined.

    python tools/offline_plots.py        # `make setup` runs it; writes .dvc/plots/offline.html

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so its plots are blank offline. This
fetches the same versions DVC asks for from the npm registry (checked against the registry's sha512),
inlines their minified builds (BSD-3-Clause; their licence notices are kept in the page) into a template
with DVC's `{plot_divs}` placeholder, and points this checkout's DVC at it (`.dvc/config.local`, not
committed). Without network access it says so and changes nothing: the PNG plots still render.
"""
from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

# The versions dvc_render's VegaRenderer loads (dvc_render/vega.py), with the npm registry's integrity hashes.
PACKAGES = {
    "vega": ("5.20.2", "qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    "vega-lite": ("5.2.0", "Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    "vega-embed": ("6.18.2", "wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
}
OUT = Path(".dvc/plots/offline.html")
PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite, vega-embed: BSD-3-Clause, (c) the University of Washington Interactive Data Lab.
         Inlined by tools/offline_plots.py so that the page needs no network. -->
{scripts}
    <style>table {{ border-spacing: 15px; }}</style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(name: str, version: str, sha512: str) -> str:
    url = f"https://registry.npmjs.org/{name}/-/{name}-{version}.tgz"
    data = urllib.request.urlopen(url, timeout=60).read()
    if base64.b64encode(hashlib.sha512(data).digest()).decode() != sha512:
        raise RuntimeError(f"{url}: sha512 differs from the npm registry's integrity hash")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.extractfile(f"package/build/{name}.min.js").read().decode()


def main() -> int:
    if not OUT.exists():
        try:
            scripts = [fetch(name, *spec) for name, spec in PACKAGES.items()]
        except (OSError, RuntimeError) as e:
            print(f"offline_plots: could not fetch Vega from the npm registry ({e}); `dvc plots show` needs a "
                  "network for its Vega plots, the PNGs under plots/ render anyway", file=sys.stderr)
            return 0
        OUT.parent.mkdir(parents=True, exist_ok=True)
        tmp = OUT.with_suffix(".tmp")
        safe = [s.replace("</script", "<\\/script") for s in scripts]  # a "</script" inside would end the tag
        tmp.write_text(PAGE.format(scripts="\n".join(f"<script>{s}</script>" for s in safe)), encoding="utf8")
        tmp.replace(OUT)
        print(f"offline_plots: {OUT} ({OUT.stat().st_size // 1024} KiB); `dvc plots show` renders offline")
    # relative to .dvc/; config.local is this checkout's own (DVC ignores it in git)
    subprocess.run([sys.executable, "-m", "dvc", "config", "--local", "plots.html_template", "plots/offline.html"],
                   check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
