"""The command line: `mailtriage` subcommands, `check`, and logging setup."""
