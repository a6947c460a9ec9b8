"""The trained demo model: a tiny SD v1 model that draws captioned shapes (shapes.py makes
the data and judges pictures; train.py trains it)."""
