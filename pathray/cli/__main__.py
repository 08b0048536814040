from pathray.cli import entry

entry()
