"""The commands: the Hydra entry points (train, evaluate, baseline, pretrain) and the `geneformer-colon` verbs."""
