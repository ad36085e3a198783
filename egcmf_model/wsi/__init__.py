"""Whole-slide images in and out: slides, tissue, registration, tiled prediction, annotations.

Nothing here is imported by training or by the federated apps; slide libraries (OpenSlide,
tiffslide) are loaded only when a slide is opened.
"""
