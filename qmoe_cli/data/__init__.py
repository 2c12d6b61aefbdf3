"""Calibration and evaluation data: tokenizers and datasets (files, the named C4 and WikiText-2,
span corruption). The synthetic corpus the shipped tiny models were trained on is not part of
the package (they ship its streams as JSONL): it lives in scripts/corpus.py, beside the
training scripts.

Imports only `errors`.
"""
