"""The toy sound world's vocabulary without numpy or torch (node menus and the tokenizer need it at start-up).

Captions name a note without its octave ("g", "b flat"): the five notes have five different letters, and none is
"a", so a note never reads as the article. :data:`NOTE_PITCHES` gives each one's octave.
"""
from __future__ import annotations

#: caption name -> scientific pitch name (equal temperament, A4 = 440 Hz). The base notes are 5 semitones apart
#: (196-466 Hz, 3-5 mel bins apart in the toy preset); "d" (D5, 587 Hz) is never shown to the base model and is 4
#: semitones or more from every base note. Every note's third harmonic (at most 1762 Hz) lies well inside the
#: preset's 60-2000 Hz, so timbre survives the picture (E5's, at 1976 Hz, is lost at the preset's top edge).
NOTE_PITCHES = {"g": "G3", "c": "C4", "f": "F4", "b flat": "Bb4", "d": "D5"}
BASE_NOTES = ("g", "c", "f", "b flat")
NEW_NOTES = ("d",)
NOTES = BASE_NOTES + NEW_NOTES

#: "pluck" (a tone that dies away after each onset) is never shown to the base model
BASE_TIMBRES = ("sine", "square", "saw")
NEW_TIMBRES = ("pluck",)
TIMBRES = BASE_TIMBRES + NEW_TIMBRES

RHYTHMS = ("steady", "twice", "four times")
#: pulses per second of each rhythm (0: one unbroken tone)
RHYTHM_RATES = {"steady": 0.0, "twice": 2.0, "four times": 4.0}
#: how a caption says each rhythm
RHYTHM_PHRASES = {"steady": "held steady", "twice": "pulsing twice", "four times": "pulsing four times"}

#: (note, timbre) pairs the base model never hears although it knows both words (compositional gaps)
HELD_OUT_COMBOS = (("c", "saw"), ("f", "square"))

#: what the judge says where it cannot name a note, timbre or rhythm
NONE = "none"
#: the judge's note for a clear pitch more than a semitone and a half from every toy note
OTHER = "other"

#: combo entry of the toy sound dataset node for "a different base note / timbre / any rhythm in every clip"
ANY = "any (base)"

#: every word a caption can hold, so a tokenizer can make each one a single token ("sks": DreamBooth's rare word)
WORDS = tuple(dict.fromkeys(
    ["a", "tone", "at", "sound", "sks", *TIMBRES,
     *(w for name in (*NOTES, *RHYTHM_PHRASES.values()) for w in name.split())]
))

_SEMITONE_OF = {"C": -9, "D": -7, "E": -5, "F": -4, "G": -2, "A": 0, "B": 2}


def pitch_hz(pitch: str) -> float:
    """Frequency of a scientific pitch name such as "A4" (440 Hz), "C#5" or "Bb3", in equal temperament."""
    letter, rest = pitch[0].upper(), pitch[1:]
    if letter not in _SEMITONE_OF or not rest:
        raise ValueError(f"not a pitch name: {pitch!r} (write a letter, an optional # or b, and an octave: 'C#5')")
    shift = {"#": 1, "b": -1}.get(rest[0], 0)
    octave = int(rest[1:] if shift else rest)
    semitones = _SEMITONE_OF[letter] + shift + 12 * (octave - 4)
    return 440.0 * 2.0 ** (semitones / 12.0)


def caption_of(note: str | None, timbre: str | None, rhythm: str | None) -> str:
    """The caption of a clip: "a square tone at c pulsing twice", "a sine tone at b flat held steady".

    Any part may be ``None`` and is then left out ("a tone at g", "a saw tone", "a tone held steady").
    """
    for value, known, what in ((note, NOTES, "note"), (timbre, TIMBRES, "timbre"), (rhythm, RHYTHMS, "rhythm")):
        if value is not None and value not in known:
            raise ValueError(f"unknown {what} {value!r}; known: {', '.join(known)}")
    words = ["a"] + ([timbre] if timbre else []) + ["tone"]
    if note:
        words += ["at", note]
    if rhythm:
        words.append(RHYTHM_PHRASES[rhythm])
    return " ".join(words)

#: the spectrogram presets' names (spectrogram.py defines the presets; tests/test_audio_nodes.py checks the names are
#: theirs), the channel choices and the ways of joining windows, for node menus and spectrogram.py
PRESET_NAMES = ("toy_8k_64mel", "riffusion_44k_512mel")
CHANNELS = ("mono mix", "left", "right", "stereo")
JOINS = ("concatenate", "batch")
