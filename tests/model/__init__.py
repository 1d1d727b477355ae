"""Tests of geneformer_colon/model/, a file a module: test_<module>.py."""
