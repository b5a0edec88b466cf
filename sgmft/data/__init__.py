"""The data layer: dataset layout, the one preprocessing function, builders and the generator.

Modules import lazily on purpose: ``schema`` and ``labels`` are light, ``preprocess``
pulls in the backbone constants, ``synth``/``build`` draw and decode images. Nothing here
imports Ray; :mod:`sgmft.ray_data` is the only bridge to Ray Data.
"""
