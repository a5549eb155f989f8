"""A tiny Flower app that plugs AutoFLIP into its own MLP and Gaussian-blob data."""
