"""Calibration and evaluation data: tokenizers, datasets (files, the named C4 and WikiText-2,
span corruption) and the synthetic corpus the embedded tiny model was trained on.

Imports only `errors`.
"""
