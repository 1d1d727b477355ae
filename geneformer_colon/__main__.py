"""`python -m geneformer_colon ...`: the `geneformer-colon` command."""

from geneformer_colon.cli.verbs import main

main()
