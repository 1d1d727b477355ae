"""Tests of geneformer_colon/jobs/, a file a module: test_<module>.py."""
