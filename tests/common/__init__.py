"""Tests of geneformer_colon/common/, a file a module: test_<module>.py."""
