"""Raw counts to tokenized, donor-split batches."""

from geneformer_colon.data.tokenizer import tokenize_anndata

__all__ = ["tokenize_anndata"]
