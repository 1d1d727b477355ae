"""Tests of geneformer_colon/assembly/, a file a module: test_<module>.py."""
