from metatrain.cli import run

run()
