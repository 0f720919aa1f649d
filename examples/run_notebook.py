"""Run examples/notebook.ipynb top to bottom (nox -s examples does), failing on any error in a cell."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

here = Path(__file__).resolve().parent
notebook = nbformat.read(here / "notebook.ipynb", as_version=4)
NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
print(f"{len(notebook.cells)} cells ran")
