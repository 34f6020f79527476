"""Command-line programs: thin wrappers that parse arguments and call into zdist."""
