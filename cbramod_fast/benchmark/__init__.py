"""Encoder benchmark: configuration, the device's peaks, the input, the timing harness, result files, CLI.

    cbramod-fast bench [--device cuda] [--shapes 12x10,19x30] [--batch 1,8] [--mode infer,train] ...

Data path: :mod:`.config` (what to run) → :mod:`.inputs` (real ECG patches) → :mod:`.harness` (time every
variant) → :mod:`.report` (JSON, markdown, plot); :mod:`.device` says what the machine can do.
"""
