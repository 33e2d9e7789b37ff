"""``harness report``: published-layout tables, the comparison and plots of a results tree."""

from __future__ import annotations

from harness.options import ReportOptions


def main(opts: ReportOptions) -> int:
    from harness.report import main as report_main

    return report_main(opts)
