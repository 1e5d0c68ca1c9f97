"""Write an HTML report (self-contained, figures embedded) for a sweep, pipeline or score run.

    python -m jobs.report runs/sweeps/smoke                 # -> runs/sweeps/smoke/report/report.html
    python -m jobs.report runs/pipeline --columns el2n --per-class 6
    python -m jobs.report runs/score --data fashion-mnist-mini --out /tmp/r   # -> /tmp/r/report/

Sections (each drawn when its inputs exist, otherwise listed as skipped with the reason):
test accuracy vs fraction per selection (figure and table), the curvature-λ curve, the LCNN
geometry table, score histograms and sorted-score curves per class, GEDA subset ECDFs vs the
whole class with KS distances, and the lowest/highest-scoring training images per class.
No Ray is needed. The report directory is replaced in one rename: an interrupted run never
leaves a report.html that looks complete.
"""
from __future__ import annotations

from typing import Sequence

from jobs._cli import Parser, entry


def build_parser() -> Parser:
    p = Parser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", metavar="RUN_OR_SWEEP_DIR",
                   help="a jobs.sweep directory (results.parquet, sweep.json), a jobs.pipeline run directory "
                        "(score/, select/, train/) or a jobs.score run directory (scores.parquet)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write the report into DIR/report (default: RUN_OR_SWEEP_DIR/report)")
    p.add_argument("--data", default=None, metavar="SPEC",
                   help="data source for the image grids (default: the one recorded in the run)")
    p.add_argument("--columns", default=None, metavar="COLS",
                   help="comma-separated score columns to draw, e.g. el2n,curvature (default: all)")
    p.add_argument("--per-class", type=int, default=8, metavar="N",
                   help="lowest and highest-scoring images shown per class and score (default %(default)s)")
    return p


def main(argv: Sequence[str]) -> None:
    a = build_parser().parse_args(argv)
    from engine.report import build_report

    columns = [c.strip() for c in a.columns.split(",") if c.strip()] if a.columns else None
    path = build_report(a.run_dir, out=a.out, data=a.data, columns=columns, per_class=a.per_class)
    print(path)


if __name__ == "__main__":
    entry("jobs.report", main)
