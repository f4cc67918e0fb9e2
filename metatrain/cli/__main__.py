"""`python -m metatrain.cli ...`: the form launchers write into job scripts and manifests."""

from metatrain.cli import run

run()
