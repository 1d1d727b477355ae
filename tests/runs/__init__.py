"""Tests of geneformer_colon/runs/, a file a module: test_<module>.py."""
