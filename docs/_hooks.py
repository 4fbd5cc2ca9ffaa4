"""MkDocs hooks: pages generated at build time from files that live elsewhere in the repository.

- ``index.md``: the README, its links into the repository pointed at the site's pages;
- ``tutorials/NN_name.md``: each ``tutorials/NN_name.py`` percent-format script, its markdown
  cells as text and its code cells as code blocks (rendered, never run);
- ``benchmarks.md``: ``benchmarks/README.md``.

Nothing is written into the repository; the pages exist only in the build. After the build the
search index is also written as a script (``search/search_index.js``), which the theme loads
instead of the JSON when the site is opened from disk (as Material's ``offline`` plugin does,
without that plugin's search shim from a CDN).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"

# README link target -> site page (relative to index.md). A README link into the repository
# that is not here and not a tutorial fails the build with the list of known targets.
README_LINKS = {
    "docs/design.md": "design.md",
    "benchmarks/README.md": "benchmarks.md",
    "site/index.html": "index.md",
    "docs/img/report.png": "img/report.png",
}
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _readme_link(match: re.Match[str]) -> str:
    target = match.group(1)
    path, _, anchor = target.partition("#")
    if "://" in path or path.startswith(("mailto:", "#")) or not path:
        return match.group(0)
    if path in README_LINKS:
        page = README_LINKS[path]
    elif path.startswith("tutorials/") and path.endswith(".py"):
        page = path[: -len(".py")] + ".md"
    else:
        raise ValueError(
            f"README.md links to {target!r}, which has no page on the docs site; expected one of "
            f"{sorted(README_LINKS)} or tutorials/*.py. Add it to README_LINKS in {__file__}."
        )
    return f"]({page}{'#' + anchor if anchor else ''})"


def readme_page(text: str) -> str:
    """The README as the site's home page, its repository links pointed at site pages."""
    return _LINK.sub(_readme_link, text)


def _cell_kind(line: str) -> str | None:
    """``"markdown"`` / ``"code"`` if ``line`` starts a percent-format cell, else ``None``."""
    stripped = line.strip()
    if not stripped.startswith("# %%"):
        return None
    return "markdown" if "[markdown]" in stripped else "code"


def _uncomment(line: str) -> str:
    if line.startswith("# "):
        return line[2:]
    return "" if line.strip() == "#" else line


def tutorial_page(source: str, name: str) -> str:
    """A percent-format script (``# %%`` cells) as markdown: markdown cells as text, code cells
    as fenced Python blocks; a note says where the script is and how to run it."""
    cells: list[tuple[str, list[str]]] = [("code", [])]
    for line in source.splitlines():
        kind = _cell_kind(line)
        if kind is not None:
            cells.append((kind, []))
        else:
            cells[-1][1].append(line)
    parts: list[str] = []
    for kind, lines in cells:
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            continue
        if kind == "markdown":
            parts.append("\n".join(_uncomment(line) for line in lines))
        else:
            parts.append("```python\n" + "\n".join(lines) + "\n```")
    note = (
        f'!!! note "Source"\n    `tutorials/{name}` in the repository, shown here without its '
        f"output: run it with `python tutorials/{name}`."
    )
    if parts and parts[0].startswith("# "):
        title, _, rest = parts[0].partition("\n")
        parts[0] = title + "\n\n" + note + ("\n" + rest if rest.strip() else "")
    else:
        parts.insert(0, f"# {name}\n\n{note}")
    return "\n\n".join(parts) + "\n"


def generated_pages() -> dict[str, str]:
    """Site path -> markdown of every page this hook generates."""
    pages = {
        "index.md": readme_page((ROOT / "README.md").read_text(encoding="utf-8")),
        "benchmarks.md": (ROOT / "benchmarks" / "README.md").read_text(encoding="utf-8"),
    }
    for script in sorted(TUTORIALS.glob("[0-9]*.py")):
        pages[f"tutorials/{script.stem}.md"] = tutorial_page(
            script.read_text(encoding="utf-8"), script.name
        )
    return pages


def on_files(files: Files, config) -> Files:
    for src_uri, content in generated_pages().items():
        if files.get_file_from_path(src_uri) is not None:
            raise ValueError(
                f"docs/{src_uri} exists, but this page is generated at build time; delete it."
            )
        files.append(File.generated(config, src_uri, content=content))
    return files


def on_post_build(config) -> None:
    index = Path(config["site_dir"]) / "search" / "search_index.json"
    if index.is_file():
        script = index.with_name("search_index.js")
        script.write_text("var __index = " + index.read_text(encoding="utf-8"), encoding="utf-8")
