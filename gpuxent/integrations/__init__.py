"""Integrations with other libraries, each imported on its own: ``gpuxent.integrations.transformers``.

Nothing is imported here, so ``import gpuxent`` never imports the libraries these integrate with.
"""
