"""Engines: one async interface (`base.Engine`), one module per kind; the gateway serves them as
registry versions (`serving/versions.py`)."""
