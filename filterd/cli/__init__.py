"""The `filterd` command line: one console script, one module per subcommand family."""
