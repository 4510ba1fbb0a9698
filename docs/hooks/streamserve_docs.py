"""mkdocs hook: the pages that are generated or included at build time, so that none can drift from its source.

- ``<!-- streamserve:config-reference -->`` becomes the configuration reference, from the pydantic settings;
- ``<!-- streamserve:cli-reference -->`` becomes the CLI reference, from the argparse parser;
- ``<!-- streamserve:include PATH -->`` becomes the repository file PATH (README.md, BENCHMARKS.md,
  k8s/README.md), which keeps living where it is.

Relative links are written for GitHub, from where their file lives. Each is rewritten for the site: a link into
docs/ points at that page; a link to an included file points at the page that includes it; a link to a folder
points at its index.md or README.md; a link to another file of the repository (an image under bench/latest/)
copies that file into the site under ``repo/`` (not a Markdown file: a page is included, never copied). A link
whose target does not exist is left alone, so ``mkdocs build --strict`` fails on it.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))  # the source of this checkout, not an installed copy
sys.path.insert(0, str(Path(__file__).resolve().parent))

import streamserve_reference as reference  # noqa: E402  (after the path above)
from mkdocs.structure.files import File, Files, InclusionLevel  # noqa: E402

INCLUDE = re.compile(r"^<!-- streamserve:include (?P<path>\S+) -->$", re.MULTILINE)
GENERATED = {
    "<!-- streamserve:config-reference -->": reference.config_reference,
    "<!-- streamserve:cli-reference -->": reference.cli_reference,
}
LINK = re.compile(r"(?P<text>!?\[(?:[^\[\]]|\[[^\]]*\])*\])\((?P<target>[^()\s]+)(?P<title>\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^( {0,3})(```|~~~)", re.MULTILINE)
COPIED_UNDER = "repo"

_included_by: dict[Path, Path] = {}
"""Repository file -> the docs page that includes it (absolute paths)."""


def on_files(files: Files, config: Any) -> Files:
    """Find which page includes which repository file, so that links to those files can go to the page."""
    docs_dir = Path(config["docs_dir"]).resolve()
    _included_by.clear()
    for file in files.documentation_pages():
        if file.abs_src_path is None:
            continue
        for match in INCLUDE.finditer(Path(file.abs_src_path).read_text(encoding="utf-8")):
            _included_by[(ROOT / match["path"]).resolve()] = docs_dir / file.src_uri
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Fill in the generated and included parts of a page, and point its links at the site."""
    docs_dir = Path(config["docs_dir"]).resolve()
    page_path = docs_dir / page.file.src_uri
    site = _Site(config, files, docs_dir, page_path.parent)
    for marker, generate in GENERATED.items():
        if marker in markdown:
            markdown = markdown.replace(marker, generate())
    pieces: list[str] = []
    position = 0
    for match in INCLUDE.finditer(markdown):
        pieces.append(site.rewrite(markdown[position : match.start()], page_path.parent))
        source = (ROOT / match["path"]).resolve()
        pieces.append(site.rewrite(source.read_text(encoding="utf-8"), source.parent))
        position = match.end()
    pieces.append(site.rewrite(markdown[position:], page_path.parent))
    return "".join(pieces)


class _Site:
    """Rewrites the relative links of a piece of markdown written at ``source_dir`` for one page."""

    def __init__(self, config: Any, files: Files, docs_dir: Path, page_dir: Path) -> None:
        self.config = config
        self.files = files
        self.docs_dir = docs_dir
        self.page_dir = page_dir

    def rewrite(self, text: str, source_dir: Path) -> str:
        """The text with each relative link outside a code fence rewritten."""
        parts = _split_fences(text)
        return "".join(
            part if fenced else LINK.sub(lambda m: self._link(m, source_dir), part) for part, fenced in parts
        )

    def _link(self, match: re.Match[str], source_dir: Path) -> str:
        target = match["target"]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
            return match[0]
        path, hash_, anchor = target.partition("#")
        resolved = Path(os.path.normpath(source_dir / path))
        new = self._site_path(resolved)
        if new is None:
            return match[0]
        relative = os.path.relpath(new, self.page_dir).replace(os.sep, "/")
        return f"{match['text']}({relative}{hash_}{anchor}{match['title'] or ''})"

    def _site_path(self, resolved: Path) -> Path | None:
        if resolved.is_dir():  # a folder stands for its index page, as on GitHub
            resolved = next(
                (resolved / name for name in ("index.md", "README.md") if (resolved / name).is_file()), resolved
            )
        if resolved in _included_by:
            return _included_by[resolved]
        if resolved.is_relative_to(self.docs_dir):
            return resolved
        if not resolved.is_file() or not resolved.is_relative_to(ROOT) or resolved.suffix == ".md":
            return None  # left as written: mkdocs reports it (a page outside docs/ must be included to be linked)
        src_uri = f"{COPIED_UNDER}/{resolved.relative_to(ROOT).as_posix()}"
        if self.files.get_file_from_path(src_uri) is None:
            copied = File.generated(self.config, src_uri, abs_src_path=str(resolved), inclusion=InclusionLevel.INCLUDED)
            self.files.append(copied)
        return self.docs_dir / src_uri


def _split_fences(text: str) -> list[tuple[str, bool]]:
    """The text cut into (piece, inside a fenced code block) pairs."""
    parts: list[tuple[str, bool]] = []
    position = 0
    fence: str | None = None
    for match in FENCE.finditer(text):
        line_end = text.find("\n", match.end())
        line_end = len(text) if line_end < 0 else line_end + 1
        if fence is None:
            parts.append((text[position : match.start()], False))
            position = match.start()
            fence = match[2]
        elif match[2] == fence:
            parts.append((text[position:line_end], True))
            position = line_end
            fence = None
    parts.append((text[position:], fence is not None))
    return parts
