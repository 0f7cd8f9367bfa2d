"""Commands shown in the docs, as tests read them."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def docs_section(title: str, page: str = "deploy.md") -> list[str]:
    """The commands of the ``sh`` blocks under ``## title`` of ``docs/<page>``."""
    text = (REPO / "docs" / page).read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/{page} has no section {title!r}"
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", match.group(1), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                commands.append(line.strip())
    return commands
