"""Datasets: manifest building, readers, decoding, content hashing and the built-in demo dataset."""
