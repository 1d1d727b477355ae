"""Tests of geneformer_colon/report/, a file a module: test_<module>.py."""
