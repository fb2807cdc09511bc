"""Command-line interface: ``hf-moe-routing <command>`` (see :mod:`hf_moe_routing.cli.main`)."""
