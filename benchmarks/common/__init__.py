"""Pieces every benchmark needs, one job a module, so that no benchmark carries its own copy."""
