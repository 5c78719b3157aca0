"""ECG/EEG pretraining corpus: readers (WFDB, EDF, NumPy) → memory-mapped shards + manifest → loader.

``build.build_corpus`` / ``cbramod-fast corpus build`` writes a corpus; ``loader.CorpusLoader`` reads it.
Submodules are imported on use so the loader does not pull in the readers' dependencies.
"""
