"""`python baseline.py ...` from a clone of the repository: the same as `geneformer-colon-baseline ...`."""

from geneformer_colon.cli.baseline import main

if __name__ == "__main__":
    main()
