"""Calibration and evaluation data: tokenizers, datasets (files, C4, span corruption) and the
synthetic corpus the embedded tiny model was trained on.

Imports only `errors`.
"""
