"""Fine-tune Geneformer to classify colorectal-cancer cells as Normal, Border or Tumor."""

__version__ = "0.1.0"
