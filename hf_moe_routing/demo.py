"""The demo moved to :mod:`hf_moe_routing.recipes.demo`; this module keeps the old import path."""

from .recipes.demo import DEFAULT_OUTPUT, SIZES, DemoConfig, DemoSize, format_report, prepare_output, run_demo

__all__ = ["DEFAULT_OUTPUT", "SIZES", "DemoConfig", "DemoSize", "format_report", "prepare_output", "run_demo"]
