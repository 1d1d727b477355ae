"""`python pretrain.py ...` from a clone of the repository: the same as `geneformer-colon-pretrain ...`."""

from geneformer_colon.cli.pretrain import main

if __name__ == "__main__":
    main()
