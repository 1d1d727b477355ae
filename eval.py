"""`python eval.py ...` from a clone of the repository: the same as `geneformer-colon-eval ...`."""

from geneformer_colon.cli.evaluate import main

if __name__ == "__main__":
    main()
