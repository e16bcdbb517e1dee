"""Plots and the self-contained HTML report, from lab results and Monitor run logs only."""

from curvscope.report.html import write_lab, write_log_report

__all__ = ["write_lab", "write_log_report"]
