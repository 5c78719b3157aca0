"""Recording readers: lead picking by name, µV conversion, WFDB / EDF / NumPy, broken files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from cbramod_fast.readers import (
    STANDARD_LEADS,
    RecordError,
    _read_wfdb_fast,
    find_records,
    normalize_lead,
    pick_leads,
    read_record,
    unit_factor,
)

# The references these tests compare with (the package itself imports them only when a file needs them).
wfdb = pytest.importorskip("wfdb")
pyedflib = pytest.importorskip("pyedflib")


@pytest.fixture(scope="module")
def data(repo_data):
    return repo_data / "corpus"


def test_lead_names_match_case_and_alias_insensitively():
    assert [normalize_lead(n) for n in ("MLII", "ii", "Lead II", "ECG II", "DII", "II")] == ["ii"] * 6
    assert normalize_lead("AVR") == normalize_lead("aVR") == "avr"
    assert normalize_lead("ECG V1") == normalize_lead("v1")
    assert normalize_lead("ECG ECG1") == normalize_lead("ecg ecg1") != normalize_lead("ECG ECG2")
    assert pick_leads(["MLII", "V5"], STANDARD_LEADS) == [None, 0] + [None] * 8 + [1, None]
    assert pick_leads(["v6", "I"], ("I", "V6", "V9")) == [1, 0, None]


def test_wfdb_12_lead_mat_in_microvolts(data):
    rec = read_record(data / "E07500.hea")
    ref = wfdb.rdrecord(str(data / "E07500"))
    assert rec.record == "E07500" and rec.fs == 500.0 and rec.present.all()
    assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float64
    np.testing.assert_array_equal(rec.signal, ref.p_signal.T * 1000.0)  # mV -> µV, exact in float64
    assert rec.units == ["mV"] * 12


def test_wfdb_missing_leads_are_zero_and_absent(data):
    rec = read_record(data / "mitdb100_60s.hea")
    ref = wfdb.rdrecord(str(data / "mitdb100_60s"))
    assert rec.fs == 360.0 and rec.signal.shape == (12, 21600)
    assert rec.present.tolist() == [lead in ("II", "V5") for lead in STANDARD_LEADS]
    assert rec.source_leads[1] == "MLII" and rec.source_leads[10] == "V5"
    np.testing.assert_array_equal(rec.signal[1], ref.p_signal[:, 0] * 1000.0)
    np.testing.assert_array_equal(rec.signal[10], ref.p_signal[:, 1] * 1000.0)
    assert not rec.signal[~rec.present].any()


def test_wfdb_lower_case_names_and_custom_order(data):
    rec = read_record(data / "ptbdb_s0010_re_11s.hea", leads=("vz", "V1", "I", "XYZ"))
    ref = wfdb.rdrecord(str(data / "ptbdb_s0010_re_11s"))
    assert rec.present.tolist() == [True, True, True, False]
    for row, ch in ((0, 14), (1, 6), (2, 0)):
        np.testing.assert_array_equal(rec.signal[row], ref.p_signal[:, ch] * 1000.0)


def _write_edf(path, sig_uv, fs, labels, unit):
    factor = {"uV": 1.0, "mV": 1e-3}[unit]
    with pyedflib.EdfWriter(str(path), len(labels), file_type=pyedflib.FILETYPE_EDFPLUS) as w:
        hdrs = []
        for lab, row in zip(labels, sig_uv):
            lim = float(f"{float(np.abs(row).max() * factor) * 1.01 + 1e-3:.5g}")  # EDF: 8 characters
            hdrs.append({"label": lab, "dimension": unit, "sample_frequency": fs, "physical_max": lim,
                         "physical_min": -lim, "digital_max": 32767, "digital_min": -32768})
        w.setSignalHeaders(hdrs)
        w.writeSamples([row * factor for row in sig_uv])


@pytest.mark.parametrize("unit", ["uV", "mV"])
def test_edf_channels_by_name_and_unit(tmp_path, data, unit):
    # real ECG (CPSC 2021, leads I and II) written as EDF+ with ECG-style labels plus a non-ECG channel
    src = read_record(data / "data_8_4.hea", leads=("I", "II"))
    sig = np.vstack([src.signal[:, :8000], src.signal[1, :8000] * 0.5])
    _write_edf(tmp_path / "rec.edf", sig, 200, ["ECG II", "ECG I", "Resp"], unit)
    rec = read_record(tmp_path / "rec.edf")
    assert rec.record == "rec" and rec.fs == 200.0 and rec.present.tolist()[:3] == [True, True, False]
    step = 2.02 * np.abs(sig).max() / 65535  # EDF's 16-bit quantisation, in µV
    np.testing.assert_allclose(rec.signal[0], sig[1], atol=step)
    np.testing.assert_allclose(rec.signal[1], sig[0], atol=step)
    assert rec.units[0] == unit


def test_numpy_npz_and_npy(tmp_path, data):
    ref = read_record(data / "data_8_4.hea", leads=("I", "II"))
    mv = ref.signal / 1000.0
    np.savez(tmp_path / "a.npz", signal=mv, fs=200.0, leads=np.array(["II", "I"]), unit="mV")
    rec = read_record(tmp_path / "a.npz")
    np.testing.assert_allclose(rec.signal[0], ref.signal[1], rtol=1e-12)  # named rows land on their lead
    np.testing.assert_allclose(rec.signal[1], ref.signal[0], rtol=1e-12)
    assert rec.present.sum() == 2 and rec.fs == 200.0
    np.save(tmp_path / "b.npy", ref.signal.astype(np.float32))
    rec = read_record(tmp_path / "b.npy", leads=("I", "II"), numpy_fs=200.0)
    np.testing.assert_allclose(rec.signal, ref.signal, rtol=1e-6)
    with pytest.raises(RecordError, match="no sampling rate"):
        read_record(tmp_path / "b.npy", leads=("I", "II"))
    with pytest.raises(RecordError, match="exactly the 12 requested leads"):
        read_record(tmp_path / "b.npy", numpy_fs=200.0)
    np.save(tmp_path / "t.npy", ref.signal.T)
    with pytest.raises(RecordError, match=r"t.npy.*\(C, T\)"):
        read_record(tmp_path / "t.npy", leads=("I", "II"), numpy_fs=200.0)
    np.savez(tmp_path / "u.npz", signal=mv, fs=200.0, leads=np.array(["I", "II"]), unit="furlong")
    with pytest.raises(RecordError, match="unknown signal unit 'furlong'"):
        read_record(tmp_path / "u.npz")
    np.savez(tmp_path / "k.npz", x=mv)
    with pytest.raises(RecordError, match="needs keys 'signal'"):
        read_record(tmp_path / "k.npz")


def test_broken_files_name_the_file_and_the_problem(tmp_path, data):
    for name in ("data_8_4.hea", "data_8_4.dat", "E07500.hea", "E07500.mat"):
        shutil.copy(data / name, tmp_path / name)
    with open(tmp_path / "data_8_4.dat", "r+b") as f:
        f.truncate(20000)
    with open(tmp_path / "E07500.mat", "r+b") as f:
        f.truncate(50000)
    for rec in ("data_8_4.hea", "E07500.hea"):
        with pytest.raises(RecordError, match=rf"{rec}: .* samples per signal, header says \d+ \(truncated file\?\)"):
            read_record(tmp_path / rec)
    # the same files through wfdb itself (the path for layouts the direct reader does not take)
    for rec in ("data_8_4", "E07500"):
        with pytest.raises(ValueError):
            wfdb.rdrecord(str(tmp_path / rec))
    (tmp_path / "junk.edf").write_bytes(b"0       not an edf" * 20)
    with pytest.raises(RecordError, match="junk.edf: unreadable EDF"):
        read_record(tmp_path / "junk.edf")
    shutil.copy(data / "data_8_4.hea", tmp_path / "orphan.hea")
    with pytest.raises(RecordError, match="orphan.hea"):
        read_record(tmp_path / "orphan.hea")
    with pytest.raises(RecordError, match="none of the requested leads"):
        read_record(data / "data_8_4.hea", leads=("V1", "V2"))


def _all_wfdb_headers(*folders) -> list:
    return sorted(h for d in folders for h in d.glob("*.hea"))


def _same_as_wfdb(hea) -> bool:
    """Our record equals wfdb.rdrecord's (names, rate, units, physical values bit for bit); True if the direct
    reader (not the wfdb fallback) produced it."""
    fast = _read_wfdb_fast(hea)
    ref = wfdb.rdrecord(str(hea.with_suffix("")))
    rec = read_record(hea, leads=tuple(ref.sig_name))
    np.testing.assert_array_equal(rec.signal, ref.p_signal.T * np.array([unit_factor(u, "") for u in ref.units])[:, None],
                                  err_msg=str(hea))
    assert rec.fs == ref.fs and rec.source_leads == ref.sig_name
    if fast is not None:
        name, fs, sig, names, units = fast
        assert (name, fs, names, units) == (ref.record_name, ref.fs, ref.sig_name, ref.units)
        np.testing.assert_array_equal(sig, ref.p_signal, err_msg=str(hea))
    return fast is not None


def test_direct_wfdb_reader_equals_wfdb(data):
    took = [_same_as_wfdb(h) for h in _all_wfdb_headers(data)]
    assert sum(took) == 5  # formats 16 (.dat and .mat with byte offset) and 212 all take the direct path


@pytest.mark.shared
def test_direct_wfdb_reader_equals_wfdb_on_all_shared_records(shared_dir):
    d = shared_dir / "data"
    heads = _all_wfdb_headers(*(p for p in d.iterdir() if p.is_dir()))
    took = [_same_as_wfdb(h) for h in heads]
    assert len(heads) == 40 and sum(took) == 39  # PTB's two signal files (.dat + .xyz) go through wfdb


def test_find_records_is_sorted_and_recursive(tmp_path, data):
    (tmp_path / "b" / "deep").mkdir(parents=True)
    (tmp_path / "a.npz").write_bytes(b"")
    (tmp_path / "b" / "deep" / "x.EDF").write_bytes(b"")
    (tmp_path / "b" / "notes.txt").write_text("")
    got = find_records([tmp_path, data / "E07500.hea"])
    assert got == [(0, "a.npz"), (0, "b/deep/x.EDF"), (1, "E07500.hea")]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        find_records([tmp_path / "nowhere"])


@pytest.mark.shared
def test_every_shared_ecg_record_reads(shared_dir):
    d = shared_dir / "data"
    files = find_records([d / "ecg_cinc2021", d / "ecg_mitdb_100", d / "ecg_cpsc2021", d / "ecg_ptbdb_s0010_re"])
    assert len(files) == 25 + 1 + 12 + 1
    for src, rel in files:
        base = [d / "ecg_cinc2021", d / "ecg_mitdb_100", d / "ecg_cpsc2021", d / "ecg_ptbdb_s0010_re"][src]
        rec = read_record(base / rel)
        assert rec.present.sum() in (2, 12) and np.isfinite(rec.signal).all()
        # an ECG in µV: R waves of hundreds to thousands of µV
        assert 100 < np.abs(rec.signal).max() < 20000, rel


@pytest.mark.shared
def test_shared_edf_ecg_channels(shared_dir):
    d = shared_dir / "data"
    rec = read_record(d / "eeg_mne_testing" / "chtypes_edf.edf", leads=("ECG ECG1", "ECG ECG2", "I"))
    assert rec.fs == 200.0 and rec.signal.shape == (3, 1000) and rec.present.tolist() == [True, True, False]
    rec = read_record(d / "eeg_ecg_eegmat" / "Subject00_1.edf", leads=("ECG ECG",))
    assert rec.fs == 500.0 and rec.units == ["mV"] and rec.signal.shape[1] > 500 * 170
    assert 100 < np.abs(rec.signal).max() < 20000  # mV in the file, µV here
