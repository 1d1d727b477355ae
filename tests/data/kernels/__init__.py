"""Tests of geneformer_colon/data/kernels/, a file a module: test_<module>.py."""
