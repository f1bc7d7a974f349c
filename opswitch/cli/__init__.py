"""The command line: argument parsing, the REPL and output formatting."""
