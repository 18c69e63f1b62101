"""Figures the notebooks show: frame grids, boxes over frames, tables, sliders with a static fallback.

Plotting only: every function takes arrays or tensors already computed by the
other modules and draws them; nothing here computes what it shows.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# Dataset and loss figures (notebooks 01 and 03)


# ---------------------------------------------------------------------------------------------
# Model figures (notebook 02)
