"""The ``smolvm`` command-line interface (typer + rich). Entry point: ``smolvm.cli.main:app``."""
