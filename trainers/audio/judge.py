"""A judge that measures a sound: pitch, timbre and rhythm of toy-world clips, with no learned part.

- **Pitch**: YIN (de Cheveigne & Kawahara 2002) per frame: the difference function, its cumulative mean
  normalisation, the first dip under an absolute threshold followed down to its minimum, and parabolic
  interpolation (on the signal interpolated to 32 kHz or more, so short periods are not coarse). The clip's
  pitch is the median over voiced frames; "none" when too few frames are voiced (noise, silence). The nearest
  toy note is named with the signed distance in cents, or "other" when it is more than
  :data:`NOTE_TOLERANCE_CENTS` away (every octave above or below a toy note is at least 200 cents from all).
- **Timbre**: a sound that dies away after each onset is a "pluck"; otherwise the levels of harmonics 2 and 3
  relative to the fundamental (a Hann-windowed power spectrum at the measured pitch) name the nearest of sine
  (neither), square (odd only, h3 = 1/3) and saw (h2 = 1/2, h3 = 1/3), or "none" when none is near.
- **Rhythm**: the RMS envelope is cut into sounding runs; the time between onsets (or releases) gives pulses
  per second: one unbroken run is "steady", about 2/s "twice", about 4/s "four times".

Works at any sample rate (numpy only; the thresholds are in seconds, Hz, cents and dB).
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .names import NONE, NOTE_PITCHES, NOTES, OTHER, RHYTHM_RATES, pitch_hz

NOTE_HZ = {name: pitch_hz(NOTE_PITCHES[name]) for name in NOTES}

# pitch (YIN)
FMIN_HZ, FMAX_HZ = 70.0, 1600.0
YIN_THRESHOLD = 0.15
YIN_HOP_S = 0.010
YIN_RATE_HZ = 32000
#: frames quieter than this (dB under the loudest frame) or than SILENCE_RMS are not looked at
QUIET_DB = -30.0
SILENCE_RMS = 1e-4
#: a clip has a pitch when at least this fraction of its sounding frames (and 3 frames) are voiced
MIN_VOICED = 0.2
NOTE_TOLERANCE_CENTS = 150.0

# timbre
#: (h2, h3) levels in dB relative to h1 of each sustained timbre; levels are floored at HARMONIC_FLOOR_DB
HARMONIC_FLOOR_DB = -30.0
TIMBRE_PROTOTYPES = {
    "sine": (HARMONIC_FLOOR_DB, HARMONIC_FLOOR_DB),
    "square": (HARMONIC_FLOOR_DB, 20 * math.log10(1 / 3)),
    "saw": (20 * math.log10(1 / 2), 20 * math.log10(1 / 3)),
}
#: farther than this (dB, Euclidean over h2 and h3) from every prototype: "none"
TIMBRE_MAX_DISTANCE_DB = 12.0
#: a pluck: the last third of its sounding runs is at least this much quieter than the first third (median)
PLUCK_DECAY_DB = -3.0

# rhythm (RMS envelope)
ENV_WINDOW_S, ENV_HOP_S = 0.020, 0.005
#: a frame sounds when its RMS is within this many dB of the loudest frame
ON_DB = -12.0
#: gaps shorter than this are bridged; runs shorter than this are dropped
MIN_GAP_S, MIN_RUN_S = 0.030, 0.025
#: pulse rates further than this factor from 2/s or 4/s are "none"
RATE_TOLERANCE = 2 ** 0.5


@dataclass
class Verdict:
    """What the judge heard: note name (or "none"/"other"), signed cents from the nearest toy note, timbre, rhythm,
    the measured pitch in Hz (0 when none) and the measurements behind the names."""

    note: str
    cents: float
    timbre: str
    rhythm: str
    hz: float = 0.0
    features: dict = field(default_factory=dict, repr=False, compare=False)


def _mono(wave) -> np.ndarray:
    """A float64 mono signal from a numpy array or torch tensor: [T], or [C, T] averaged over channels."""
    if hasattr(wave, "detach"):
        wave = wave.detach().cpu().float().numpy()
    x = np.asarray(wave, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"a clip must be [samples] or [channels, samples], got shape {tuple(x.shape)}")
    return x


def _frames(x: np.ndarray, size: int, hop: int) -> np.ndarray:
    """Frames of ``size`` samples every ``hop`` (the signal zero-padded to fill the last one): [F, size]."""
    if len(x) < size:
        x = np.pad(x, (0, size - len(x)))
    n = 1 + int(math.ceil((len(x) - size) / hop))
    x = np.pad(x, (0, (n - 1) * hop + size - len(x)))
    return np.lib.stride_tricks.sliding_window_view(x, size)[::hop][:n]


def _difference(frames: np.ndarray, window: int, tau_max: int) -> tuple[np.ndarray, np.ndarray]:
    """YIN's difference function d(tau) and its cumulative mean normalisation d'(tau), tau = 0..tau_max, for
    frames [F, window + tau_max] (the cross term by FFT)."""
    size = 1 << int(math.ceil(math.log2(window + tau_max + 1)))
    a = np.fft.rfft(frames[:, :window], size)
    b = np.fft.rfft(frames, size)
    cross = np.fft.irfft(np.conj(a) * b, size)[:, :tau_max + 1]
    sq = np.concatenate([np.zeros((len(frames), 1)), np.cumsum(frames ** 2, axis=1)], axis=1)
    energy_0 = sq[:, window:window + 1]
    energy_tau = sq[:, window:window + tau_max + 1] - sq[:, :tau_max + 1]
    diff = np.maximum(energy_0 + energy_tau - 2.0 * cross, 0.0)
    running = np.cumsum(diff[:, 1:], axis=1)
    out = np.ones_like(diff)
    out[:, 1:] = diff[:, 1:] * np.arange(1, tau_max + 1) / np.maximum(running, 1e-12)
    return diff, out


def _yin_period(diff: np.ndarray, dprime: np.ndarray, tau_min: int, threshold: float) -> float | None:
    """The period (samples) of one frame: the first dip of d' under ``threshold`` followed down to its minimum,
    refined by a parabola through d (d' is tilted by its normalisation, which biases high pitches sharp); None
    when no dip."""
    below = np.flatnonzero(dprime[tau_min:] < threshold)
    if not len(below):
        return None
    tau = tau_min + int(below[0])
    while tau + 1 < len(dprime) and dprime[tau + 1] < dprime[tau]:
        tau += 1
    if tau + 1 >= len(dprime):
        return None  # still falling at the longest period looked at: not a period in range
    while tau - 1 > tau_min and diff[tau - 1] < diff[tau]:
        tau -= 1
    while tau + 2 < len(diff) and diff[tau + 1] < diff[tau]:
        tau += 1
    left, mid, right = diff[tau - 1], diff[tau], diff[tau + 1]
    bend = left - 2.0 * mid + right
    return tau + (0.5 * (left - right) / bend if bend > 0 else 0.0)


def upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Band-limited interpolation by an integer factor (the spectrum zero-padded)."""
    if factor <= 1:
        return x
    spectrum = np.fft.rfft(x)
    return np.fft.irfft(spectrum, len(x) * factor) * factor


def pitch_track(x: np.ndarray, sample_rate: int) -> tuple[np.ndarray, int]:
    """YIN pitch (Hz) of every frame, NaN where unvoiced, and how many frames were loud enough to look at.

    Low rates are first interpolated up to YIN_RATE_HZ or more: a period of a dozen samples (659 Hz at 8 kHz)
    leaves a sharp-cornered d(tau) whose parabolic minimum is several cents off."""
    factor = int(math.ceil(YIN_RATE_HZ / sample_rate))
    x, sample_rate = upsample(x, factor), sample_rate * factor
    tau_max = int(math.ceil(sample_rate / FMIN_HZ))
    tau_min = max(2, int(sample_rate / FMAX_HZ))
    window = max(tau_max, int(0.025 * sample_rate))
    frames = _frames(x, window + tau_max, max(1, int(round(YIN_HOP_S * sample_rate))))
    rms = np.sqrt(np.mean(frames[:, :window] ** 2, axis=1))
    loud = (rms > SILENCE_RMS) & (rms >= rms.max(initial=0.0) * 10 ** (QUIET_DB / 20))
    f0 = np.full(len(frames), np.nan)
    if loud.any():
        diff, dprime = _difference(frames[loud], window, tau_max)
        periods = [_yin_period(d, dp, tau_min, YIN_THRESHOLD) for d, dp in zip(diff, dprime)]
        f0[np.flatnonzero(loud)] = [sample_rate / p if p else np.nan for p in periods]
    return f0, int(loud.sum())


def measure_pitch(x: np.ndarray, sample_rate: int) -> tuple[float, float]:
    """The clip's pitch in Hz (median over voiced frames; 0 when none) and its voiced fraction."""
    f0, loud = pitch_track(x, sample_rate)
    voiced = f0[np.isfinite(f0)]
    fraction = len(voiced) / loud if loud else 0.0
    if len(voiced) < 3 or fraction < MIN_VOICED:
        return 0.0, fraction
    return float(np.exp(np.median(np.log(voiced)))), fraction


def name_note(hz: float) -> tuple[str, float]:
    """The nearest toy note and the signed cents from it; "other" beyond the tolerance, "none" for 0 Hz."""
    if hz <= 0:
        return NONE, 0.0
    cents = {name: 1200.0 * math.log2(hz / ref) for name, ref in NOTE_HZ.items()}
    name = min(cents, key=lambda n: abs(cents[n]))
    return (name if abs(cents[name]) <= NOTE_TOLERANCE_CENTS else OTHER), cents[name]


def harmonic_levels(x: np.ndarray, sample_rate: int, hz: float, count: int = 3) -> list[float]:
    """Levels (dB re the fundamental, floored at HARMONIC_FLOOR_DB) of harmonics 2..count at pitch ``hz``, from a
    power spectrum averaged over Hann windows of ~128 ms (harmonics at or above Nyquist read as the floor)."""
    size = 1 << int(math.ceil(math.log2(0.128 * sample_rate)))
    frames = _frames(x, size, size // 4)
    power = np.mean(np.abs(np.fft.rfft(frames * np.hanning(size), axis=1)) ** 2, axis=0)
    bin_hz = sample_rate / size
    levels = []
    for k in range(1, count + 1):
        centre = k * hz
        if centre >= sample_rate / 2 - bin_hz:
            levels.append(0.0)
            continue
        half = max(0.03 * centre, 1.5 * bin_hz)
        lo, hi = int(math.floor((centre - half) / bin_hz)), int(math.ceil((centre + half) / bin_hz))
        levels.append(float(power[max(lo, 0):hi + 1].max()))
    ref = max(levels[0], 1e-30)
    return [max(10.0 * math.log10(max(p, 1e-30) / ref), HARMONIC_FLOOR_DB) for p in levels[1:]]


def envelope_db(x: np.ndarray, sample_rate: int) -> np.ndarray:
    """RMS envelope in dB under its loudest frame (ENV_WINDOW_S windows every ENV_HOP_S)."""
    frames = _frames(x, max(1, int(ENV_WINDOW_S * sample_rate)), max(1, int(ENV_HOP_S * sample_rate)))
    rms = np.sqrt(np.mean(frames ** 2, axis=1))
    peak = rms.max(initial=0.0)
    if peak <= SILENCE_RMS:
        return np.full(len(rms), -120.0)
    return 20.0 * np.log10(np.maximum(rms / peak, 1e-6))


def sounding_runs(env: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) frame ranges where the envelope is within ON_DB of its peak; short gaps bridged, short runs
    dropped."""
    on = np.concatenate([[False], env >= ON_DB, [False]])
    edges = np.flatnonzero(np.diff(on.astype(np.int8)))
    runs = [[int(s), int(e)] for s, e in zip(edges[::2], edges[1::2])]
    merged: list[list[int]] = []
    for run in runs:
        if merged and (run[0] - merged[-1][1]) * ENV_HOP_S < MIN_GAP_S:
            merged[-1][1] = run[1]
        else:
            merged.append(run)
    return [(s, e) for s, e in merged if (e - s) * ENV_HOP_S >= MIN_RUN_S]


def pulse_rate(runs: list[tuple[int, int]], frames: int) -> float:
    """Pulses per second from sounding runs: 0 for one run; else 1 / the median time between onsets (and between
    releases) that the clip's ends do not cut; else runs per second."""
    if len(runs) <= 1:
        return 0.0
    starts = [s for s, _ in runs if s > 0]
    ends = [e for _, e in runs if e < frames]
    steps = list(np.diff(starts)) + list(np.diff(ends))
    if steps:
        return 1.0 / (float(np.median(steps)) * ENV_HOP_S)
    return len(runs) / (frames * ENV_HOP_S)


def name_rhythm(rate: float, runs: int) -> str:
    """"steady" for one sounding run, the rhythm whose pulse rate is nearest (within RATE_TOLERANCE), or "none"."""
    if runs == 0:
        return NONE
    if rate == 0:
        return "steady"
    pulsed = {name: r for name, r in RHYTHM_RATES.items() if r > 0}
    name = min(pulsed, key=lambda n: abs(math.log(rate / pulsed[n])))
    return name if abs(math.log(rate / pulsed[name])) <= math.log(RATE_TOLERANCE) else NONE


def decay_db(env: np.ndarray, runs: list[tuple[int, int]]) -> float:
    """Median over sounding runs of (mean dB of the run's last third - its first third): ~0 for a held tone whose
    onsets and releases mirror each other, well under 0 for a tone that dies away."""
    drops = []
    for s, e in runs:
        third = (e - s) // 3
        if third >= 2:
            drops.append(float(env[e - third:e].mean() - env[s:s + third].mean()))
    return float(np.median(drops)) if drops else 0.0


def name_timbre(levels: list[float], decay: float) -> str:
    """"pluck" when the sound dies away, else the nearest sustained prototype by (h2, h3) levels, or "none"."""
    if decay <= PLUCK_DECAY_DB:
        return "pluck"
    dist = {name: math.dist(levels[:2], proto) for name, proto in TIMBRE_PROTOTYPES.items()}
    name = min(dist, key=dist.get)
    return name if dist[name] <= TIMBRE_MAX_DISTANCE_DB else NONE


def judge_clip(wave, sample_rate: int) -> Verdict:
    """Measure one clip ([T] or [C, T], numpy or torch) at any sample rate."""
    x = _mono(wave)
    hz, voiced = measure_pitch(x, sample_rate)
    note, cents = name_note(hz)
    env = envelope_db(x, sample_rate)
    runs = sounding_runs(env)
    rate = pulse_rate(runs, len(env))
    decay = decay_db(env, runs)
    levels = harmonic_levels(x, sample_rate, hz) if hz > 0 else [HARMONIC_FLOOR_DB, HARMONIC_FLOOR_DB]
    timbre = name_timbre(levels, decay) if hz > 0 else NONE
    features = {"voiced": voiced, "h2_db": levels[0], "h3_db": levels[1], "decay_db": decay, "runs": len(runs),
                "rate": rate}
    return Verdict(note, cents, timbre, name_rhythm(rate, len(runs)), hz, features)


def _expected(value, n: int) -> list | None:
    """One expected name for every clip (a single name repeats), or None."""
    if value is None:
        return None
    values = [value] * n if isinstance(value, str) else list(value)
    if len(values) != n:
        raise ValueError(f"{len(values)} expected values for {n} clips")
    return values


def judge_many(waves, sample_rate: int, expected_note=None, expected_timbre=None, expected_rhythm=None) -> dict:
    """Judge clips and score them: ``*_acc`` is the fraction named as expected (None when nothing was expected);
    ``median_abs_cents`` is the median |cents| of voiced clips from the expected note (from the nearest note when
    none is expected; None when no clip is voiced). ``counts`` tallies each name heard; ``verdicts`` lists them."""
    verdicts = [judge_clip(w, sample_rate) for w in waves]
    n = len(verdicts)
    out: dict = {"n": n, "verdicts": verdicts, "counts": {
        key: dict(Counter(getattr(v, key) for v in verdicts)) for key in ("note", "timbre", "rhythm")}}
    for key, expected in (("note", expected_note), ("timbre", expected_timbre), ("rhythm", expected_rhythm)):
        want = _expected(expected, n)
        out[f"{key}_acc"] = None if want is None or not n else (
            sum(getattr(v, key) == w for v, w in zip(verdicts, want)) / n)
    notes = _expected(expected_note, n)
    cents = [abs(1200.0 * math.log2(v.hz / NOTE_HZ[w])) if notes and w in NOTE_HZ else abs(v.cents)
             for v, w in zip(verdicts, notes or [None] * n) if v.hz > 0]
    out["median_abs_cents"] = float(np.median(cents)) if cents else None
    return out
