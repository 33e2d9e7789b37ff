"""Results on disk: content-addressed run directories (claim, completion, config.yaml) and the one
table formatter every console and report table prints through."""
