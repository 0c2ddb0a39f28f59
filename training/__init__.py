"""The offline pipeline: data loading, splitting, scaling, training, evaluation, importers."""
