"""One module per CLI verb; the only code that sees the parsed command line (typed options)."""
