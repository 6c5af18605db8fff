"""Sound files in, sound files out: WAV with the standard library, other formats with PyAV where it is installed.

ComfyUI decodes audio with PyAV (``av``, in its requirements), so inside ComfyUI every format its Load Audio reads is
read here too; outside it a .wav always works. Nothing here needs torchaudio, librosa or soundfile.
"""
from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

#: the suffixes Load Audio Dataset looks for
SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a")


def _av():
    try:
        import av
    except ImportError:
        return None
    return av


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """The file's samples as float32 (C, T) in [-1, 1] and its sample rate. WAV (8/16/24/32-bit PCM) is read by the
    standard library; other formats, and WAV it cannot read (float WAV), by PyAV. Raises ValueError naming the file
    and what was wrong."""
    path = Path(path)
    if path.suffix.lower() == ".wav":
        try:
            return _read_wav(path)
        except (wave.Error, EOFError, ValueError) as e:
            if _av() is None:
                raise ValueError(f"{path.name}: not a PCM WAV file this reader understands ({e}); save it as 16-bit "
                                 "PCM WAV, or install PyAV (pip install av) to read other encodings") from None
    return _read_av(path)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as f:
        channels, width, rate, n = f.getnchannels(), f.getsampwidth(), f.getframerate(), f.getnframes()
        raw = f.readframes(n)
    if width == 1:
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 2:
        x = np.frombuffer(raw, "<i2").astype(np.float32) / 32768
    elif width == 3:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        x = ((b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)) << 8 >> 8).astype(np.float32) / 8388608
    elif width == 4:
        x = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648
    else:
        raise ValueError(f"{width * 8}-bit samples")
    if len(x) < channels or len(x) % channels:
        raise ValueError("the file is cut short")
    return np.ascontiguousarray(x.reshape(-1, channels).T), rate


def _read_av(path: Path) -> tuple[np.ndarray, int]:
    av = _av()
    if av is None:
        raise ValueError(f"{path.name}: reading {path.suffix or 'this'} files needs PyAV, which ComfyUI installs "
                         "(pip install av); or convert the file to WAV")
    try:
        with av.open(str(path)) as box:
            stream = next((s for s in box.streams if s.type == "audio"), None)
            if stream is None:
                raise ValueError("it holds no audio stream")
            rate, parts = int(stream.rate), []
            for frame in box.decode(stream):
                a = frame.to_ndarray()
                if frame.format.is_planar is False:  # interleaved: (1, T*C) -> (C, T)
                    a = a.reshape(-1, len(frame.layout.channels)).T
                parts.append(_to_float(a))
    except ValueError as e:
        raise ValueError(f"{path.name}: {e}") from None
    except Exception as e:  # PyAV's own errors (InvalidDataError, ...) name no file
        raise ValueError(f"{path.name}: not a readable sound file ({type(e).__name__}: {e}); if it was downloaded "
                         "or copied, fetch it again") from None
    if not parts:
        raise ValueError(f"{path.name}: the file holds no sound")
    return np.concatenate(parts, axis=1), rate


def _to_float(a: np.ndarray) -> np.ndarray:
    if a.dtype.kind == "f":
        return a.astype(np.float32)
    scale = float(np.iinfo(a.dtype).max) + 1
    return a.astype(np.float32) / scale


def write_wav(path: Path, waveform: np.ndarray, sample_rate: int) -> Path:
    """16-bit PCM WAV of a (C, T) or (T,) float waveform in [-1, 1] (the run folder's previews), written whole or
    not at all (a temporary name renamed into place)."""
    from ..runs.atomic import write_file

    x = np.atleast_2d(np.asarray(waveform, dtype=np.float32))
    pcm = (np.clip(x, -1, 1) * 32767).round().astype("<i2").T.tobytes()

    def write(tmp: Path) -> None:
        with wave.open(str(tmp), "wb") as f:
            f.setnchannels(x.shape[0])
            f.setsampwidth(2)
            f.setframerate(int(sample_rate))
            f.writeframes(pcm)

    return write_file(Path(path), write)
