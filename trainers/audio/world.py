"""The toy sound world: deterministic captioned clips of tones, the sound analogue of the coloured shapes.

A clip is one note (the colour), played with one timbre (the shape), in one rhythm. Clips are 8192 samples at
8 kHz (1.024 s): one 64 x 64 picture of the ``toy_8k_64mel`` spectrogram preset. Every random choice (phase,
loudness within +-3 dB, detune within +-5 cents, where the pulses fall) comes from a ``numpy.random.Generator``
the caller seeds, so a seed always gives the same clips.

The base model hears :data:`BASE_NOTES` x :data:`BASE_TIMBRES` minus :data:`HELD_OUT_COMBOS`, in every rhythm. The
note ``d`` (D5) and the timbre ``pluck`` are never played to it: they are the new concepts fine-tuning teaches.
Timbres are band-limited (only harmonics below the Nyquist frequency), envelopes ramp in and out (no clicks), and
the judge (:mod:`.judge`) tells them apart by measuring, not by a learned classifier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .names import (  # noqa: F401  (re-exported: the world's vocabulary)
    ANY, BASE_NOTES, BASE_TIMBRES, HELD_OUT_COMBOS, NEW_NOTES, NEW_TIMBRES, NOTE_PITCHES, RHYTHM_RATES, RHYTHMS,
    TIMBRES, WORDS, caption_of, pitch_hz,
)

SAMPLE_RATE = 8000
#: samples in a clip: 64 frames of the toy preset's hop (128) = 1.024 s
CLIP_LENGTH = 8192
#: caption name -> frequency in Hz (base notes first, then the new one)
NOTES: dict[str, float] = {name: pitch_hz(NOTE_PITCHES[name]) for name in BASE_NOTES + NEW_NOTES}

#: fraction of each pulse period that sounds; the rest is silence
PULSE_DUTY = 0.6
#: raised-cosine ramp at every onset and release (and at the clip's two ends)
RAMP_S = 0.010
#: a pluck's fundamental dies away with this time constant; harmonic k decays (1 + (k - 1) / 2) times faster
PLUCK_DECAY_S = 0.10
#: the random variation of a clip: detune (cents), loudness (dB around the peak level)
DETUNE_CENTS = 5.0
LOUDNESS_DB = 3.0
PEAK_LEVEL = 0.5


@dataclass
class Clip:
    """One captioned clip: ``wave`` is mono float32 in [-1, 1] at ``sample_rate``."""

    wave: np.ndarray = field(repr=False)
    sample_rate: int
    caption: str
    note: str | None
    timbre: str | None
    rhythm: str | None


def base_classes() -> list[tuple[str, str]]:
    """The (note, timbre) pairs the base model is trained on (every rhythm of each)."""
    return [(n, t) for n in BASE_NOTES for t in BASE_TIMBRES if (n, t) not in HELD_OUT_COMBOS]


def all_classes() -> list[tuple[str, str]]:
    """Every (note, timbre) pair of the world, new ones included."""
    return [(n, t) for n in NOTES for t in TIMBRES]


def _harmonics(timbre: str, hz: float, sample_rate: int) -> list[tuple[int, float]]:
    """(harmonic number, amplitude) of a timbre, every harmonic below the Nyquist frequency (no aliasing)."""
    top = int((sample_rate / 2 - 1e-6) // hz)
    if top < 1:
        raise ValueError(f"{hz:.1f} Hz is above the Nyquist frequency of {sample_rate} Hz")
    if timbre == "sine":
        return [(1, 1.0)]
    if timbre == "square":
        return [(k, 1.0 / k) for k in range(1, top + 1, 2)]
    if timbre in ("saw", "pluck"):
        return [(k, (-1.0) ** (k + 1) / k) for k in range(1, top + 1)]
    raise ValueError(f"unknown timbre {timbre!r}; known: {', '.join(TIMBRES)}")


def _ramp(u: np.ndarray) -> np.ndarray:
    """Raised cosine from 0 (u <= 0) to 1 (u >= 1)."""
    return 0.5 - 0.5 * np.cos(np.pi * np.clip(u, 0.0, 1.0))


def envelope(rhythm: str, t: np.ndarray, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """The gate of a rhythm at times ``t`` (seconds) and each time's age since the latest onset (for plucks).

    Pulsed rhythms sound for :data:`PULSE_DUTY` of each period, onsets at ``offset + m / rate``; every onset and
    release is a :data:`RAMP_S` raised-cosine ramp. "steady" is one tone from t = 0.
    """
    if rhythm not in RHYTHM_RATES:
        raise ValueError(f"unknown rhythm {rhythm!r}; known: {', '.join(RHYTHMS)}")
    rate = RHYTHM_RATES[rhythm]
    if rate == 0:
        return np.ones_like(t), t - t[0]
    period = 1.0 / rate
    on = PULSE_DUTY * period
    age = np.mod(t - offset, period)
    gate = _ramp(age / RAMP_S) * _ramp((on - age) / RAMP_S)
    return gate, age


def synth(hz: float, timbre: str, rhythm: str, rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
          length: int = CLIP_LENGTH) -> np.ndarray:
    """One tone at ``hz`` (before the random detune) as float32, peak at :data:`PEAK_LEVEL` +- :data:`LOUDNESS_DB`.

    The clip fades in and out over :data:`RAMP_S` at its ends, so it starts and ends at silence.
    """
    hz = float(hz) * 2.0 ** (rng.uniform(-DETUNE_CENTS, DETUNE_CENTS) / 1200.0)
    phase = rng.uniform(0.0, 2.0 * math.pi)
    rate = RHYTHM_RATES.get(rhythm, 0.0)
    offset = rng.uniform(0.0, 1.0 / rate) if rate else 0.0
    level = PEAK_LEVEL * 10.0 ** (rng.uniform(-LOUDNESS_DB, LOUDNESS_DB) / 20.0)
    t = np.arange(length) / float(sample_rate)
    gate, age = envelope(rhythm, t, offset)
    wave = np.zeros(length)
    for k, amp in _harmonics(timbre, hz, sample_rate):
        partial = amp * np.sin(2.0 * math.pi * k * hz * t + k * phase)
        if timbre == "pluck":
            partial *= np.exp(-age * (1.0 + 0.5 * (k - 1)) / PLUCK_DECAY_S)
        wave += partial
    wave *= gate * _ramp(t / RAMP_S) * _ramp((t[-1] - t) / RAMP_S)
    peak = float(np.max(np.abs(wave)))
    return (wave * (level / peak if peak > 0 else 0.0)).astype(np.float32)


def make_clip(note: str, timbre: str, rhythm: str, rng: np.random.Generator, *, sample_rate: int = SAMPLE_RATE,
              length: int = CLIP_LENGTH, caption: str | None = None) -> Clip:
    """One clip of ``note`` played as ``timbre`` in ``rhythm``; the caption is :func:`caption_of` unless given."""
    if note not in NOTES:
        raise ValueError(f"unknown note {note!r}; known: {', '.join(NOTES)}")
    wave = synth(NOTES[note], timbre, rhythm, rng, sample_rate=sample_rate, length=length)
    return Clip(wave, sample_rate, caption_of(note, timbre, rhythm) if caption is None else caption, note, timbre,
                rhythm)


def sample_clips(rng: np.random.Generator, n: int, notes=BASE_NOTES, timbres=BASE_TIMBRES, rhythms=RHYTHMS, *,
                 exclude=HELD_OUT_COMBOS, caption: str | None = None, sample_rate: int = SAMPLE_RATE,
                 length: int = CLIP_LENGTH) -> list[Clip]:
    """``n`` clips, each of a (note, timbre, rhythm) drawn uniformly from the given ones, the (note, timbre) pairs
    in ``exclude`` left out. ``caption`` may hold ``{note}``, ``{timbre}`` and ``{rhythm}``, filled per clip."""
    choices = [(a, b, c) for a in notes for b in timbres for c in rhythms if (a, b) not in set(exclude)]
    if not choices:
        raise ValueError(f"no clip to make: every pairing of notes {list(notes)} and timbres {list(timbres)} "
                         f"is excluded ({list(exclude)})")
    out = []
    for _ in range(n):
        note, timbre, rhythm = choices[int(rng.integers(len(choices)))]
        text = None if caption is None else (
            caption.replace("{note}", note).replace("{timbre}", timbre).replace("{rhythm}", rhythm))
        out.append(make_clip(note, timbre, rhythm, rng, sample_rate=sample_rate, length=length, caption=text))
    return out
