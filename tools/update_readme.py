"""Regenerate the README's config reference from the schema: python tools/update_readme.py"""

from pathlib import Path

from kdkit.config.reference import BEGIN, END, render_reference

readme = Path(__file__).resolve().parents[1] / "README.md"
text = readme.read_text()
start, end = text.index(BEGIN), text.index(END) + len(END)
readme.write_text(text[:start] + render_reference() + text[end:])
print(f"updated {readme}")
