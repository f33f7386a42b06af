"""The README's config reference is the schema's, and its two commands are the Makefile's."""

import re
from pathlib import Path

from kdkit.config.reference import BEGIN, END, render_reference

ROOT = Path(__file__).resolve().parents[2]


def test_config_reference_is_current():
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(BEGIN), readme.index(END) + len(END)
    assert readme[start:end] == render_reference(), "run: python tools/update_readme.py"


def test_readme_opens_with_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```\n(.*?)```", readme, re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo") and first_block.splitlines()[1].startswith("make test")
    makefile = (ROOT / "Makefile").read_text()
    assert "\ndemo:" in makefile and "\ntest:" in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
