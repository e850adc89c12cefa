"""The HTML template of `dvc plots show` and `dvc plots diff`, with the chart library inside, so the page needs no network.

    python -m sft_pipeline.plots_page [--out PATH]     (`make install` and `make run` run it)

Reads  vega, vega-lite and vega-embed from the installed package django-js-lib-vega-embed (the upstream builds as
       published on npm, without their source-map comment; no Django is needed: only the files are read), and the
       DVC config key plots.html_template (.dvc/config; a relative path is relative to .dvc/, as DVC reads it)
Writes that template (default .dvc/plots_template.html, git-ignored): DVC's page with the three scripts inlined

DVC's own page loads the scripts from a CDN, so offline it is blank ("vegaEmbed is not defined"). A template can only
name files by a path relative to wherever the page is written (`dvc plots show -o` moves it), so the scripts go
inside the page instead: about 0.8 MB, and the page still renders after it is copied or mailed.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata, resources
from pathlib import Path

from sft_pipeline.io import StageError, atomic_path, run_main

PACKAGE = "django-js-lib-vega-embed"
# In the order they must load: vega-lite and vega-embed find `vega` (and vega-embed `vegaLite`) as globals.
SCRIPTS = ("vega5.js", "vega-lite5.js", "vega-embed6.js")
# What DVC (dvc_render.html.HTML.embed) replaces in a template; {scripts} is left out, it is DVC's CDN tags.
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")
DEFAULT_TEMPLATE = "plots_template.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed from the PyPI package {package} {version}, inlined by
         `python -m sft_pipeline.plots_page`: this page loads nothing from the network. -->
{scripts}
    <script>
        // SVG instead of vega-embed's default canvas: labels stay text (found by search, sharp when zoomed), and
        // tests can read what was drawn.
        vegaEmbed = ((embed) => (el, spec, opt) => embed(el, spec, {{renderer: "svg", ...opt}}))(vegaEmbed);
    </script>
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def library() -> dict[str, str]:
    """The three scripts' text, by file name, from the installed package."""
    try:
        folder = resources.files("js_lib_vega_embed").joinpath("static", "js_lib_vega_embed")
    except ModuleNotFoundError:
        raise StageError(f"the package {PACKAGE} is not installed; run `make install` "
                         f"(or pip install -c constraints.txt {PACKAGE})") from None
    return {name: folder.joinpath(name).read_text(encoding="utf-8") for name in SCRIPTS}


def template(scripts: dict[str, str], version: str = "") -> str:
    """DVC's page with the scripts inlined; a script that would end the tag early or hold a placeholder DVC fills is
    refused (DVC replaces placeholders anywhere in the page, code included)."""
    blocks = []
    for name, code in scripts.items():
        found = [p for p in ("</script", *PLACEHOLDERS) if p in code.lower()]
        if found:
            raise StageError(f"{name} from {PACKAGE} {version} contains {found[0]!r}, which would break the "
                             f"inlined page; pin the version in constraints.txt")
        blocks.append(f"    <script>/* {name} */\n{code}\n    </script>")
    return PAGE.format(package=PACKAGE, version=version, scripts="\n".join(blocks))


def configured_path(root: Path = Path(".")) -> Path:
    """Where DVC looks for the template: plots.html_template, relative to .dvc/ as `dvc plots show` reads it."""
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            value = repo.config.get("plots", {}).get("html_template")
            dvc_dir = Path(repo.dvc_dir)
    except Exception as exc:  # dvc's NotDvcRepoError and config errors
        raise StageError(f"{root.resolve()}: cannot read the DVC config ({exc})") from None
    if not value:
        raise StageError(f"{dvc_dir / 'config'} sets no plots.html_template; run "
                         f"`dvc config plots.html_template {DEFAULT_TEMPLATE}`")
    return Path(value) if Path(value).is_absolute() else dvc_dir / value


def write(out: Path) -> Path:
    page = template(library(), metadata.version(PACKAGE))
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
        tmp.chmod(0o644)  # a temporary file is private; the page is not
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="where to write it (default: the DVC config's plots.html_template)")
    args = parser.parse_args(argv)

    def body() -> None:
        out = write(args.out or configured_path())
        print(f"{out}: the offline template of `dvc plots show` ({out.stat().st_size / 1e6:.1f} MB)")

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
