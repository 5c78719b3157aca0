"""ECG/EEG pretraining corpus: recordings (:mod:`cbramod_fast.readers`) → memory-mapped shards + manifest → loader.

``build.build_corpus`` / ``cbramod-fast corpus build`` writes a corpus, ``merge`` joins parts of one,
``loader.CorpusLoader`` reads it; ``windows`` cuts a few recordings into windows in memory (tests,
experiments, the benchmark input). Submodules are imported on use so the loader does not pull in the
readers' dependencies.
"""
