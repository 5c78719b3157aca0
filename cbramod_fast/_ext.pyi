import numpy as np

FLAG_FLAT: int
FLAG_CLIPPED: int
FLAG_OVER_AMPLITUDE: int
FLAG_NONFINITE: int

def patchify_f32(x: np.ndarray, patch: int, threads: int = 0) -> np.ndarray: ...
def patchify_f64(x: np.ndarray, patch: int, threads: int = 0) -> np.ndarray: ...
def filtfilt_f32(
    x: np.ndarray, sos: np.ndarray, zi: np.ndarray, padlen: int, threads: int = 0
) -> tuple[np.ndarray, int, int]: ...
def filtfilt_f64(
    x: np.ndarray, sos: np.ndarray, zi: np.ndarray, padlen: int, threads: int = 0
) -> tuple[np.ndarray, int, int]: ...
def resample_f32(x: np.ndarray, h: np.ndarray, up: int, down: int, threads: int = 0) -> tuple[np.ndarray, int, int]: ...
def resample_f64(x: np.ndarray, h: np.ndarray, up: int, down: int, threads: int = 0) -> tuple[np.ndarray, int, int]: ...
def preprocess_f32(
    x: np.ndarray, band_sos: np.ndarray, band_zi: np.ndarray, band_padlen: int, notch_sos: np.ndarray,
    notch_zi: np.ndarray, notch_padlen: int, h: np.ndarray, up: int, down: int, scale: float, patch: int,
    max_abs: float, flat_ptp: float, clip_run: int, threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]: ...
def preprocess_f64(
    x: np.ndarray, band_sos: np.ndarray, band_zi: np.ndarray, band_padlen: int, notch_sos: np.ndarray,
    notch_zi: np.ndarray, notch_padlen: int, h: np.ndarray, up: int, down: int, scale: float, patch: int,
    max_abs: float, flat_ptp: float, clip_run: int, threads: int = 0,
) -> tuple[np.ndarray, np.ndarray]: ...
