"""The pieces put together from a config: datamodule, classifier, trainer; a split scored;
a trained classifier loaded."""
