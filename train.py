"""`python train.py ...` from a clone of the repository: the same as `geneformer-colon-train ...`."""

from geneformer_colon.cli.train import main

if __name__ == "__main__":
    main()
