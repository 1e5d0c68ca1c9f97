"""The HTML report of a sweep, pipeline or score run (``python -m jobs.report RUN_DIR``).

``build_report(run_dir)`` finds what the directory holds (``inputs.discover``), draws every
figure whose inputs exist (``figures``; matplotlib Agg, one PNG each) and writes
``RUN_DIR/report/report.html``, self-contained (PNGs embedded as base64, inline CSS), plus
the PNGs, atomically (``build``). Sections without inputs are listed as skipped, with why.
"""
from engine.report.build import build_report

__all__ = ["build_report"]
