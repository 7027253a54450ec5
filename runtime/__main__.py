"""``python -m runtime`` is ``python -m runtime.detect``."""
from runtime.detect import cli

cli()
