"""Tests of geneformer_colon/data/, a file a module: test_<module>.py."""
