"""``python -m moequant``: the command line, as ``torchrun ... -m moequant compress`` starts it on every rank."""

from moequant_cli.main import app

app()
