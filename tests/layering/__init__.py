"""The static layering test: the product's import graph, read with ast, against declared rules."""
