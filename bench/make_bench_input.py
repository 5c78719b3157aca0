"""Rebuild the benchmark's input array from the shipped demo ECG records.

    python bench/make_bench_input.py      # writes cbramod_fast/data/ecg_demo_patches.npz

Run it when the demo records or the preprocessing change; ``tests/test_benchmark.py`` fails until the
shipped array equals what this script makes.
"""

from __future__ import annotations

import numpy as np

from cbramod_fast.atomic import atomic_write
from cbramod_fast.benchmark.inputs import DEMO_RECORDS, PATCHES, make_patch_stream


def main() -> None:
    patches = make_patch_stream(DEMO_RECORDS)
    arrays = {"patches": patches, "source": np.asarray(f"{DEMO_RECORDS.name}: 12-lead CinC 2021 windows, "
                                                          "0.5-45 Hz, 200 Hz, uV/100")}

    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    atomic_write(PATCHES, save)
    print(f"wrote {PATCHES}: patches {patches.shape} {patches.dtype}")


if __name__ == "__main__":
    main()
