"""``ferrum bench``: named workloads timed on Ferrum and on a peer in the same run."""

from ferrum.bench.figures import Figures, ratios
from ferrum.bench.run import BenchOptions, format_report, run_bench, write_json
from ferrum.bench.workloads import WORKLOADS

__all__ = ["WORKLOADS", "BenchOptions", "Figures", "format_report", "ratios", "run_bench", "write_json"]
