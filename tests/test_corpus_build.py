"""Corpus build on real ECG: windows and provenance, determinism across workers, resume after a kill
(in-process at every commit point, and a real SIGKILL of a build subprocess), --part + merge,
broken files, rejection reasons, CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal as os_signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cbramod_fast.corpus import build as B
from cbramod_fast.corpus.build import CorpusConfig, build_corpus, preprocess_record
from cbramod_fast.corpus.loader import CorpusLoader
from cbramod_fast.corpus.merge import merge_corpora
from cbramod_fast.readers import RecordError, read_record

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "cbramod_fast" / "data" / "ecg_demo"  # 25 CinC 2021 records + MIT-BIH 100 (30 min)
# record -> 10-s windows of the shipped test records (10 s, 10 s, 41 s, 60 s, 11 s)
EXPECTED = {"E07500": 1, "JS20000": 1, "data_8_4": 4, "mitdb100_60s": 6, "ptbdb_s0010_re_11s": 1}


@pytest.fixture(scope="module")
def src(repo_data) -> Path:
    return repo_data / "corpus"


@pytest.fixture(scope="module")
def built(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("built")
    build_corpus([src], out, CorpusConfig(shard_windows=4), workers=1, progress=False)
    return out


def shard_arrays(corpus: Path) -> tuple[np.ndarray, np.ndarray]:
    man = json.loads((corpus / "manifest.json").read_text())
    xs = [np.load(corpus / s["x"], mmap_mode="r") for s in man["shards"]]
    ps = [np.load(corpus / s["present"]) for s in man["shards"]]
    return np.concatenate(xs), np.concatenate(ps)


def records(corpus: Path) -> list[dict]:
    return json.loads((corpus / "manifest.json").read_text())["records"]


def test_windows_are_the_records_pipeline_output_with_provenance(built, src):
    man = json.loads((built / "manifest.json").read_text())
    cfg = CorpusConfig.from_dict(man["config"])
    assert man["n_windows"] == sum(EXPECTED.values()) and man["shape"] == [12, 10, 200]
    assert {r["record"]: r["count"] for r in man["records"]} == EXPECTED
    assert man["counts"]["rejected"] == dict.fromkeys(B.REJECT_REASONS, 0)  # clean recordings
    assert [s["n"] for s in man["shards"]] == [4, 4, 4, 1]
    x, present = shard_arrays(built)
    assert x.dtype == np.float16 and x.shape == (13, 12, 10, 200)
    seen = set()
    for r in man["records"]:
        rec = read_record(src / r["file"])
        patches, _ = preprocess_record(rec, cfg)
        for k, off in enumerate(r["offsets"]):
            g = r["first"] + k
            seen.add(g)
            p0 = off // 200
            want = patches[:, p0:p0 + 10].astype(np.float16)
            np.testing.assert_array_equal(x[g], want, err_msg=f"{r['file']} window {k}")
            np.testing.assert_array_equal(present[g], rec.present)
    assert seen == set(range(13))
    mit = next(r for r in man["records"] if r["record"] == "mitdb100_60s")
    assert mit["fs"] == 360.0 and mit["source_leads"][1] == "MLII" and mit["offsets"] == [0, 2000, 4000, 6000,
                                                                                        8000, 10000]
    # per-lead statistics: II is in every record, V5 in the 12-lead ones and MIT-BIH, V1 only in the 12-lead ones
    assert man["lead_stats"]["II"]["windows"] == 13 and man["lead_stats"]["V1"]["windows"] == 3
    assert man["lead_stats"]["V5"]["windows"] == 9
    ii = x[:, 1].astype(np.float64)
    assert man["lead_stats"]["II"]["std"] == pytest.approx(ii.std(), rel=1e-6)
    # the loader serves exactly these rows
    for b in CorpusLoader(built, batch_size=5, seed=0, drop_last=False):
        np.testing.assert_array_equal(b["x"].numpy(), x[b["index"].numpy()].astype(np.float32))
        assert torch.equal(b["present"], torch.from_numpy(present[b["index"].numpy()]))


def test_rerun_of_a_finished_build_is_a_no_op_and_other_settings_refuse(built, src):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    build_corpus([src], built, CorpusConfig(shard_windows=4), progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before
    with pytest.raises(ValueError, match="--overwrite"):
        build_corpus([src], built, CorpusConfig(shard_windows=4, scale=1.0), progress=False)


def test_shards_do_not_depend_on_workers(built, src, tmp_path):
    build_corpus([src], tmp_path, CorpusConfig(shard_windows=4), workers=2, progress=False)
    for a, b in zip(shard_arrays(built), shard_arrays(tmp_path)):
        np.testing.assert_array_equal(a, b)
    assert records(built) == records(tmp_path)


class _Killed(BaseException):
    pass


def test_resume_from_every_commit_point_gives_the_same_corpus(built, src, tmp_path, monkeypatch):
    """Stop the build just before its m-th durable write (journal or resume point), for every m, and rerun."""
    real = B.write_json
    m = 0
    while True:
        m += 1
        out = tmp_path / f"k{m}"
        calls = 0

        def dying(obj, path, _m=m):
            nonlocal calls
            calls += 1
            if calls == _m:
                raise _Killed
            real(obj, path)

        monkeypatch.setattr(B, "write_json", dying)
        try:
            build_corpus([src], out, CorpusConfig(shard_windows=4), progress=False)
            finished_first_time = True
        except _Killed:
            finished_first_time = False
        monkeypatch.setattr(B, "write_json", real)
        if finished_first_time:
            break
        assert not (out / "manifest.json").exists()
        build_corpus([src], out, CorpusConfig(shard_windows=4), progress=False)
        for a, b in zip(shard_arrays(built), shard_arrays(out)):
            np.testing.assert_array_equal(a, b)
        assert records(built) == records(out), f"kill before write {m}"
        assert json.loads((out / "manifest.json").read_text())["counts"] == \
            json.loads((built / "manifest.json").read_text())["counts"]
        assert not (out / "build_state.json").exists()
    assert m > 5  # 4 shards x (journal + resume point) + manifest: every one of them was a kill point


def test_sigkilled_build_subprocess_resumes_exactly(tmp_path):
    """Really kill a `cbramod-fast corpus build` once its first shard appears, then rerun it to the end."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cbramod_fast", "corpus", "build", "--src", str(DEMO), "--out", str(out),
           "--shard-windows", "8", "--workers", "1"]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    # cwd outside the checkout: `-m` puts the cwd first on sys.path, and the source tree has no built _ext
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (out / "x-00000.npy").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(os_signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the build finished before it could be killed"
    n_shards_at_kill = len(list(out.glob("x-*.npy")))
    for p in out.glob("x-*.npy"):  # every visible shard is complete
        np.load(p, mmap_mode="r")
    rerun = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    ref = tmp_path / "ref"
    build_corpus([DEMO], ref, CorpusConfig(shard_windows=8), workers=1, progress=False)
    for a, b in zip(shard_arrays(ref), shard_arrays(out)):
        np.testing.assert_array_equal(a, b)
    assert records(ref) == records(out)
    assert not list(out.glob("*.tmp")) and not (out / "build_state.json").exists()
    assert n_shards_at_kill < len(json.loads((out / "manifest.json").read_text())["shards"])


def test_parts_merged_equal_one_build(built, src, tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}"
        man = build_corpus([src], p, CorpusConfig(shard_windows=4), part=f"{i}/3", progress=False)
        assert man["part"] == [i, 3] and man["counts"]["files"] in (1, 2)
        parts.append(p)
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        merge_corpora([parts[0], parts[2]], tmp_path / "bad")
    merged = merge_corpora([parts[2], parts[0], parts[1]], tmp_path / "merged")  # order of arguments is free
    assert merged["n_windows"] == 13 and not list((tmp_path / "merged").glob("*.npy"))  # nothing copied
    for a, b in zip(shard_arrays(built), shard_arrays(tmp_path / "merged")):
        np.testing.assert_array_equal(a, b)
    strip = [{k: v for k, v in r.items()} for r in records(built)]
    assert records(tmp_path / "merged") == strip
    full = json.loads((built / "manifest.json").read_text())
    assert merged["counts"] == full["counts"]
    assert merged["lead_stats"]["II"]["std"] == pytest.approx(full["lead_stats"]["II"]["std"], rel=1e-9)
    loader = CorpusLoader(tmp_path / "merged", batch_size=13, drop_last=False)
    assert sorted(next(iter(loader))["index"].tolist()) == list(range(13))
    with pytest.raises(ValueError, match="i/n"):
        build_corpus([src], tmp_path / "x", part="3/3", progress=False)


def test_broken_files_are_skipped_with_reason_or_fail_in_strict_mode(src, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for name in ("E07500.hea", "E07500.mat", "data_8_4.hea", "data_8_4.dat"):
        shutil.copy(src / name, d / name)
    with open(d / "data_8_4.dat", "r+b") as f:
        f.truncate(20000)
    (d / "junk.edf").write_bytes(b"0       not an edf" * 20)
    man = build_corpus([d], tmp_path / "c", CorpusConfig(shard_windows=4), progress=False)
    assert man["n_windows"] == 1 and man["counts"]["skipped_files"] == 2
    reasons = {s["file"]: s["error"] for s in man["skipped"]}
    assert "truncated file?" in reasons["data_8_4.hea"] and "unreadable EDF" in reasons["junk.edf"]
    with pytest.raises(RecordError, match="data_8_4.hea"):
        build_corpus([d], tmp_path / "strict", CorpusConfig(shard_windows=4), strict=True, progress=False)
    assert not (tmp_path / "strict" / "manifest.json").exists()
    from cbramod_fast.cli import main

    assert main(["corpus", "build", "--src", str(d), "--out", str(tmp_path / "s2"), "--strict", "--workers", "1"]) == 2


def test_rejections_are_counted_per_reason(src, tmp_path):
    """Real CPSC 2021 ECG (41 s, leads I, II) with a defect planted in the middle of each 10-s window."""
    rec = read_record(src / "data_8_4.hea", leads=("I", "II"))
    sig = rec.signal.copy()
    fs = 200
    sig[0, 5 * fs] = np.nan  # window 0: a missing sample
    sig[1, 25 * fs:25 * fs + 20] += 20000.0  # window 2: a 20 mV artefact
    sig[1, 15 * fs:15 * fs + 40] = np.nanmax(sig[1]) * 1.2  # window 1: 0.2 s at the rail (the lead's maximum)
    sig[0, 22 * fs:] = np.nanmedian(sig[0])  # lead I disconnected from 22 s (a constant): flat in window 3
    d = tmp_path / "src"
    d.mkdir()
    np.savez(d / "planted.npz", signal=sig, fs=float(fs), leads=np.array(["I", "II"]), unit="uV")
    cfg = CorpusConfig(leads=("I", "II"), shard_windows=4)
    man = build_corpus([d], tmp_path / "absent", cfg, progress=False)
    assert man["counts"]["rejected"] == {"non_finite": 1, "flat": 0, "clipped": 1, "over_amplitude": 1}
    assert man["n_windows"] == 1 and man["records"][0]["offsets"] == [30 * fs]
    assert man["counts"]["flat_leads_masked"] == 1
    _, present = shard_arrays(tmp_path / "absent")
    assert present.tolist() == [[False, True]]
    cfg_r = CorpusConfig(leads=("I", "II"), shard_windows=4, flat_leads="reject")
    man = build_corpus([d], tmp_path / "reject", cfg_r, progress=False)
    assert man["counts"]["rejected"] == {"non_finite": 1, "flat": 1, "clipped": 1, "over_amplitude": 1}
    assert man["n_windows"] == 0


def test_cli_build_info_merge(src, tmp_path, capsys):
    from cbramod_fast.cli import main

    out = tmp_path / "c"
    assert main(["corpus", "build", "--src", str(src), "--out", str(out), "--workers", "1", "--shard-windows", "8",
                 "--leads", "II,V5", "--dtype", "float32"]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["leads"] == ["II", "V5"] and man["dtype"] == "float32" and man["n_windows"] == 13
    assert np.load(out / "x-00000.npy", mmap_mode="r").shape == (8, 2, 10, 200)
    capsys.readouterr()
    assert main(["corpus", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_windows"] == 13 and info["counts"]["records"] == 5
    assert main(["corpus", "info", str(out), "--plot", str(tmp_path / "c.png")]) == 0
    assert "13 windows" in capsys.readouterr().out
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["corpus", "merge", str(out), "--out", str(tmp_path / "m")]) == 0
    assert main(["corpus", "build", "--src", str(src), "--out", str(tmp_path / "p"), "--part", "2/2"]) == 2
    assert "--part" in capsys.readouterr().err
    assert main(["corpus", "build", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "p")]) == 2
    assert main(["corpus", "info", str(tmp_path / "nowhere")]) == 2


@pytest.mark.shared
def test_build_all_shared_ecg(shared_dir, tmp_path):
    d = shared_dir / "data"
    srcs = [d / "ecg_cinc2021", d / "ecg_mitdb_100", d / "ecg_cpsc2021", d / "ecg_ptbdb_s0010_re"]
    man = build_corpus(srcs, tmp_path, CorpusConfig(shard_windows=128), workers=2, progress=False)
    c = man["counts"]
    assert c["files"] == c["records"] == 39 and c["skipped_files"] == 0
    # every full 10 s of every record is either kept or rejected for a stated reason
    n_full = sum(int(r["n_samples"] / r["fs"]) // 10 for r in man["records"])
    assert man["n_windows"] + sum(c["rejected"].values()) == n_full
    assert man["n_windows"] > 0.95 * n_full
    for lead, s in man["lead_stats"].items():
        assert s["windows"] > 0 and 0.3 < s["std"] < 10, (lead, s)  # ECG in µV/100: std of order 1
    loader = CorpusLoader(tmp_path, batch_size=64, seed=0, num_workers=2)
    idx = torch.cat([b["index"] for b in loader])
    assert len(idx) == len(loader) * 64 and len(set(idx.tolist())) == len(idx)


def test_overlapping_windows_and_short_records(src, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    for name in ("data_8_4.hea", "data_8_4.dat", "ptbdb_s0010_re_11s.hea", "ptbdb_s0010_re_11s.dat"):
        shutil.copy(src / name, d / name)
    man = build_corpus([d], tmp_path / "c", CorpusConfig(window_patches=10, stride_patches=5), progress=False)
    got = {r["record"]: r["offsets"] for r in man["records"]}
    assert got["data_8_4"] == [0, 1000, 2000, 3000, 4000, 5000, 6000]  # 41 s, 10-s windows every 5 s
    assert got["ptbdb_s0010_re_11s"] == [0]
    man = build_corpus([d], tmp_path / "long", CorpusConfig(window_patches=30), progress=False)
    got = {r["record"]: r["count"] for r in man["records"]}
    assert got == {"data_8_4": 1, "ptbdb_s0010_re_11s": 0}  # too short for one window: kept as a record, 0 windows
    assert man["shape"] == [12, 30, 200] and man["n_windows"] == 1


def test_multi_segment_master_header_is_skipped_not_doubled(src, tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(src / "data_8_4.hea", d / "data_8_4.hea")
    shutil.copy(src / "data_8_4.dat", d / "data_8_4.dat")
    (d / "multi.hea").write_text("multi/1 2 200 8235\ndata_8_4 8235\n")
    man = build_corpus([d], tmp_path / "c", progress=False)
    assert [r["record"] for r in man["records"]] == ["data_8_4"]
    assert "multi-segment" in man["skipped"][0]["error"]


def test_mixed_formats_and_notch(src, tmp_path):
    """WFDB, EDF+ and .npz sources in one build; EDF/npz hold real ECG from the shipped WFDB records."""
    pytest.importorskip("pyedflib")
    from test_readers import _write_edf

    d = tmp_path / "src"
    d.mkdir()
    shutil.copy(src / "E07500.hea", d / "E07500.hea")
    shutil.copy(src / "E07500.mat", d / "E07500.mat")
    cpsc = read_record(src / "data_8_4.hea", leads=("I", "II"))
    _write_edf(d / "cpsc.edf", cpsc.signal, 200, ["ECG I", "ECG II"], "uV")
    mit = read_record(src / "mitdb100_60s.hea", leads=("II", "V5"))
    np.savez(d / "mit.npz", signal=mit.signal / 1000.0, fs=360.0, leads=np.array(["MLII", "V5"]), unit="mV")
    cfg = CorpusConfig(leads=("I", "II", "V5"), shard_windows=64)
    man = build_corpus([d], tmp_path / "c", cfg, progress=False)
    assert {r["file"]: r["count"] for r in man["records"]} == {"E07500.hea": 1, "cpsc.edf": 4, "mit.npz": 6}
    x, present = shard_arrays(tmp_path / "c")
    assert present.tolist() == [[True, True, True]] + [[True, True, False]] * 4 + [[False, True, True]] * 6
    # the npz (mV, MLII) and the WFDB original (µV after conversion) give the same windows
    ref = build_corpus([src / "mitdb100_60s.hea"], tmp_path / "ref", cfg, progress=False)
    assert ref["n_windows"] == 6
    np.testing.assert_array_equal(shard_arrays(tmp_path / "ref")[0], x[5:])
    notched = build_corpus([d], tmp_path / "n", CorpusConfig(leads=("I", "II", "V5"), notch=50.0), progress=False)
    assert notched["config"]["notch"] == 50.0 and notched["n_windows"] == 11
    xn = shard_arrays(tmp_path / "n")[0].astype(np.float32)
    assert 0 < np.abs(xn - x.astype(np.float32)).max() < 0.5 * np.abs(x.astype(np.float32)).max()
