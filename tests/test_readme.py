"""The README's Python examples run as they stand: the blocks of each section in order, in one namespace."""

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def examples() -> dict[str, list[str]]:
    """Section title -> its ```python blocks."""
    found, title = {}, None
    for part in re.split(r"^(#{2,3} .*)$", README.read_text(), flags=re.M):
        if re.match(r"#{2,3} ", part):
            title = part.lstrip("# ")
        else:
            found.setdefault(title, []).extend(re.findall(r"```python\n(.*?)```", part, flags=re.S))
    return {title: blocks for title, blocks in found.items() if blocks}


@pytest.mark.parametrize("section", sorted(examples()))
def test_the_readme_examples_run(section):
    torch.manual_seed(0)
    namespace = {}
    for block in examples()[section]:
        exec(compile(block, f"README.md, {section}", "exec"), namespace)
