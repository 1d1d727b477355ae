"""Tests of geneformer_colon/cli/, a file a module: test_<module>.py."""
