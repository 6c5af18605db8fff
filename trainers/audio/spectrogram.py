"""Sound <-> picture: mel spectrograms as ComfyUI IMAGE pictures, and back by Griffin-Lim, in torch alone.

A sound becomes one picture per window of ``preset.frames`` STFT columns (``preset.window_samples`` samples):
``torch.stft`` (Hann window of ``win_length`` samples centred in ``n_fft``, ``center=True``, reflect padding at the
sound's two ends) of the whole sound, magnitudes (power 1), a triangular mel filterbank, then the preset's picture
mapping. The pictures of one sound are consecutive slices of that one STFT, so a window's edges see its
neighbours. Rows run from the highest mel band (top row) to the lowest (bottom row).

Picture mappings (``v`` is the picture value, 0..1, before the optional inversion ``v -> 1 - v``):

* ``"db"`` (the toy preset): ``v = (20 log10(m + a) - db_min) / (db_max - db_min)`` clipped to 0..1, with
  ``a = 10 ** (db_min / 20)``, so silence is exactly 0 and the range is fixed: loudness survives.
* ``"power"`` (Riffusion): ``v = (m / max) ** power`` with ``max`` the picture's largest mel amplitude (all its
  channels); decoding assumes ``max = preset.max_value``, so absolute loudness is lost.

Mono pictures are grey (R = G = B). Stereo pictures, as Riffusion's, hold the left channel in G, the right in B and
0 in R. Pictures are not quantised; ComfyUI's saving (``clip(255 v)`` then ``uint8``) truncates to the same
grey levels as Riffusion's ``uint8`` cast (up to float rounding).

Back to sound: the mapping's inverse, mel -> linear magnitudes by the filterbank's pseudo-inverse clipped at 0,
then fast Griffin-Lim (momentum ``MOMENTUM``, uniform random start phase from a ``torch.Generator`` seeded by
``seed``) with the same ``torch.stft``/``torch.istft`` settings. Each picture is rebuilt with some columns of
context on each side (its neighbours' columns when joined, its own edge columns repeated otherwise) and the
windows are joined with a raised-cosine crossfade of ``preset.crossfade`` samples centred on each boundary, so
the joined sound keeps exact timing: N pictures give exactly ``N * window_samples`` samples.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .names import CHANNELS, JOINS  # noqa: F401  (declared torch-free, for node menus)
from .resample import resample

MEL_SCALES = ("htk", "slaney")
MAPPINGS = ("db", "power")
#: fast Griffin-Lim's momentum (as Riffusion's torchaudio GriffinLim)
MOMENTUM = 0.99
#: most complex STFT entries handled at once (pictures are processed in groups under it)
_BUDGET = 1 << 24


@dataclass(frozen=True)
class Preset:
    """Everything that fixes how a sound becomes a picture and back: both directions must use the same preset."""

    name: str
    """The preset's name, a key of :data:`PRESETS`."""
    sample_rate: int
    """Hz; sounds are resampled to it first."""
    n_fft: int
    """FFT size in samples (the window is zero-padded to it, centred)."""
    win_length: int
    """Hann window length in samples (``torch.hann_window``, periodic)."""
    hop: int
    """Samples between STFT columns; one picture column per hop."""
    n_mels: int
    """Mel bands = picture height."""
    f_min: float
    """Lowest mel filter edge, Hz."""
    f_max: float
    """Highest mel filter edge, Hz."""
    mel_scale: str
    """``"htk"`` (2595 log10(1 + f/700)) or ``"slaney"`` (linear to 1 kHz, logarithmic above)."""
    frames: int
    """Picture width in STFT columns (hops)."""
    mapping: str
    """``"db"`` (fixed dB range) or ``"power"`` (amplitude / picture max, to a power): see the module docstring."""
    loud_dark: bool
    """True: loud = dark (the picture is inverted, as Riffusion's); False: loud = bright, silence black."""
    gain: float
    """A float sound (full scale +-1) is multiplied by this before the STFT (and divided after Griffin-Lim)."""
    db_min: float = -70.0
    """``"db"``: the level (dB of mel amplitude, after ``gain``) shown as 0, silence; lower is clipped to it."""
    db_max: float = 10.0
    """``"db"``: the level shown as 1; higher is clipped to it."""
    power: float = 0.25
    """``"power"``: the exponent applied to amplitude / max."""
    max_value: float = 30e6
    """``"power"``: the picture max assumed when decoding (mel amplitude, after ``gain``)."""
    mel_norm: str | None = None
    """None (triangles peak at 1) or ``"slaney"`` (each triangle scaled to unit area, 2 / (f_hi - f_lo))."""
    peak: float | None = None
    """Decoded sound is scaled to this peak (None: keep the level the picture encodes)."""
    crossfade: int = 512
    """Samples of the raised-cosine crossfade centred on each join of consecutive pictures (even)."""

    def __post_init__(self):
        if self.mel_scale not in MEL_SCALES or self.mapping not in MAPPINGS or self.mel_norm not in (None, "slaney"):
            raise ValueError(f"preset {self.name}: mel_scale {self.mel_scale!r}, mapping {self.mapping!r} or "
                             f"mel_norm {self.mel_norm!r} is not one of {MEL_SCALES}, {MAPPINGS}, (None, 'slaney')")
        if not (0 < self.win_length <= self.n_fft and 0 < self.hop and 0 <= self.f_min < self.f_max
                <= self.sample_rate / 2 and self.frames > 0 and self.crossfade % 2 == 0):
            raise ValueError(f"preset {self.name}: inconsistent STFT, mel or crossfade sizes")

    @property
    def window_samples(self) -> int:
        """Samples one picture covers: ``frames * hop``."""
        return self.frames * self.hop

    @property
    def n_freqs(self) -> int:
        """Linear STFT bins, ``n_fft // 2 + 1``."""
        return self.n_fft // 2 + 1


PRESETS: dict[str, Preset] = {
    # 64x64 pictures of 1.024 s at 8 kHz; 64 HTK mels over 60-2000 Hz keep toy notes within ~16 cents (AUDIO.md 3).
    # gain 1/128 = 2 / sum(hann(512)): a full-scale sine's STFT peak is 1 (0 dB), about v = 0.85..0.95.
    "toy_8k_64mel": Preset(
        name="toy_8k_64mel", sample_rate=8000, n_fft=512, win_length=512, hop=128, n_mels=64, f_min=60.0,
        f_max=2000.0, mel_scale="htk", frames=64, mapping="db", loud_dark=False, gain=1 / 128,
        db_min=-70.0, db_max=10.0, crossfade=512),
    # Riffusion v1 (riffusion-hobby's SpectrogramParams and image_util): 44.1 kHz, 100 ms window padded to 400 ms,
    # 10 ms hop, 512 HTK mels (no norm) over 0-10 kHz, 512 columns = 5.12 s; (m / max) ** 0.25, inverted, low
    # frequencies at the bottom; int16-scaled samples (gain 32768), decoding assumes max 30e6. Riffusion normalises
    # its output to full scale; here to 0.9 (headroom for lossy codecs).
    "riffusion_44k_512mel": Preset(
        name="riffusion_44k_512mel", sample_rate=44100, n_fft=17640, win_length=4410, hop=441, n_mels=512,
        f_min=0.0, f_max=10000.0, mel_scale="htk", frames=512, mapping="power", loud_dark=True, gain=32768.0,
        power=0.25, max_value=30e6, peak=0.9, crossfade=4410),
}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(preset: Preset | str) -> Preset:
    """A :class:`Preset` from itself or its name (ValueError naming the known ones otherwise)."""
    if isinstance(preset, Preset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown spectrogram preset {preset!r}; known: {', '.join(PRESET_NAMES)}")
    return PRESETS[preset]


def hz_to_mel(f: torch.Tensor, scale: str) -> torch.Tensor:
    """HTK: ``2595 log10(1 + f/700)``; Slaney: ``3f/200`` below 1 kHz, ``15 + 27 ln(f/1000) / ln 6.4`` above."""
    if scale == "htk":
        return 2595.0 * torch.log10(1.0 + f / 700.0)
    above = 15.0 + torch.log(f.clamp_min(1e-10) / 1000.0) * 27.0 / math.log(6.4)
    return torch.where(f < 1000.0, f * 3.0 / 200.0, above)


def mel_to_hz(m: torch.Tensor, scale: str) -> torch.Tensor:
    """The inverse of :func:`hz_to_mel`."""
    if scale == "htk":
        return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    return torch.where(m < 15.0, m * 200.0 / 3.0, 1000.0 * torch.exp((m - 15.0) * math.log(6.4) / 27.0))


def mel_filterbank(preset: Preset | str) -> torch.Tensor:
    """[n_mels, n_fft // 2 + 1] float64: triangles on ``n_mels + 2`` points evenly spaced in mel between f_min and
    f_max, evaluated at the STFT bin frequencies ``k * sample_rate / n_fft`` (peak 1, or unit area for Slaney norm)."""
    p = get_preset(preset)
    freqs = torch.linspace(0.0, p.sample_rate / 2, p.n_freqs, dtype=torch.float64)
    lo, hi = hz_to_mel(torch.tensor([p.f_min, p.f_max], dtype=torch.float64), p.mel_scale)
    pts = mel_to_hz(torch.linspace(float(lo), float(hi), p.n_mels + 2, dtype=torch.float64), p.mel_scale)
    gaps = pts[1:] - pts[:-1]
    rel = pts[None, :] - freqs[:, None]  # [n_freqs, n_mels + 2]
    rising = -rel[:, :-2] / gaps[:-1]
    falling = rel[:, 2:] / gaps[1:]
    fb = torch.minimum(rising, falling).clamp_min(0.0)
    if p.mel_norm == "slaney":
        fb = fb * (2.0 / (pts[2:] - pts[:-2]))[None, :]
    return fb.T.contiguous()


def mel_pseudo_inverse(preset: Preset | str) -> torch.Tensor:
    """[n_fft // 2 + 1, n_mels] float64: the filterbank's Moore-Penrose pseudo-inverse ``fb^T (fb fb^T)^-1`` (the
    presets' filterbanks have full row rank: singular values 0.5..1.8 toy, 0.7..4.7 Riffusion), by Cholesky; a
    rank-deficient filterbank falls back to the eigen-decomposition, eigenvalues under 1e-10 of the largest dropped."""
    fb = mel_filterbank(preset)
    gram = fb @ fb.T
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return torch.cholesky_solve(fb, chol).T
    lam, vec = torch.linalg.eigh(gram)
    keep = lam > 1e-10 * lam.max()
    return fb.T @ ((vec[:, keep] / lam[keep]) @ vec[:, keep].T)


@lru_cache(maxsize=8)
def _filterbank(preset: Preset, device: torch.device) -> torch.Tensor:
    return mel_filterbank(preset).float().to(device)


@lru_cache(maxsize=8)
def _pseudo_inverse(preset: Preset, device: torch.device) -> torch.Tensor:
    return mel_pseudo_inverse(preset).float().to(device)


def _stft(x: torch.Tensor, p: Preset, center: bool) -> torch.Tensor:
    window = torch.hann_window(p.win_length, device=x.device)
    return torch.stft(x, p.n_fft, p.hop, p.win_length, window, center=center, pad_mode="reflect",
                      return_complex=True)


def _istft(spec: torch.Tensor, p: Preset, length: int) -> torch.Tensor:
    window = torch.hann_window(p.win_length, device=spec.device)
    return torch.istft(spec, p.n_fft, p.hop, p.win_length, window, center=True, length=length)


def _as_channels(waveform: torch.Tensor, channels: str) -> torch.Tensor:
    """[T], [C, T] or [1, C, T] -> float [C', T] with C' = 1, or 2 for ``"stereo"`` (a mono sound is doubled)."""
    if channels not in CHANNELS:
        raise ValueError(f"channels must be one of {CHANNELS}, got {channels!r}")
    w = waveform
    if w.dim() == 3 and w.shape[0] == 1:
        w = w[0]
    if w.dim() == 1:
        w = w[None]
    if w.dim() != 2 or w.shape[0] < 1:
        raise ValueError(f"waveform must be [T], [C, T] or [1, C, T], got {tuple(waveform.shape)}")
    w = w.float() if not w.is_floating_point() else w
    if channels == "mono mix":
        return w.mean(0, keepdim=True)
    if channels == "left":
        return w[:1]
    if channels == "right":
        return w[-1:]
    return w[:2] if w.shape[0] >= 2 else w[:1].expand(2, -1)


def _mel_columns(x: torch.Tensor, p: Preset) -> torch.Tensor:
    """[C, n * window_samples] -> mel amplitudes [C, n_mels, n * frames]: column ``g`` is the centred STFT frame
    at sample ``g * hop`` of the whole sound (reflect padding at its ends), computed a group of windows at a time."""
    C, total = x.shape
    W, n = p.frames, total // p.window_samples
    fb = _filterbank(p, x.device)
    padded = F.pad(x[None], (p.n_fft // 2, p.n_fft // 2), mode="reflect")[0]
    group = max(1, _BUDGET // (W * p.n_freqs * C))
    out = []
    for s in range(0, n, group):
        e = min(n, s + group)
        seg = padded[:, s * W * p.hop: (e * W - 1) * p.hop + p.n_fft]
        out.append(torch.matmul(fb, _stft(seg, p, center=False).abs()))
    return torch.cat(out, dim=-1)


def _encode(mel: torch.Tensor, p: Preset) -> torch.Tensor:
    """Mel amplitudes [n, C, n_mels, W] -> pictures [n, n_mels, W, 3] (mapping, inversion, flip, channel layout)."""
    if p.mapping == "db":
        floor = 10.0 ** (p.db_min / 20.0)
        v = (20.0 * torch.log10(mel + floor) - p.db_min) / (p.db_max - p.db_min)
    else:
        top = mel.amax(dim=(1, 2, 3), keepdim=True)
        v = (mel / torch.where(top > 0, top, torch.ones_like(top))) ** p.power
    v = v.clamp(0.0, 1.0)
    if p.loud_dark:
        v = 1.0 - v
    v = v.flip(2)
    rgb = v.expand(-1, 3, -1, -1) if v.shape[1] == 1 else torch.cat([torch.zeros_like(v[:, :1]), v[:, :2]], 1)
    return rgb.permute(0, 2, 3, 1).float().contiguous()


def to_pictures(waveform: torch.Tensor, sample_rate: int, preset: Preset | str,
                channels: str = "mono mix") -> tuple[torch.Tensor, int]:
    """A sound -> spectrogram pictures, one per ``preset.window_samples`` (the last padded with silence).

    ``waveform``: float [C, T] (or [T], or ComfyUI's [1, C, T]) at ``sample_rate`` Hz, full scale +-1; resampled to
    ``preset.sample_rate`` first. ``channels``: one of :data:`CHANNELS` ("mono mix" averages the channels, "left" /
    "right" take one, "stereo" puts left in G and right in B). Returns ``(pictures, length)``: pictures
    [N, n_mels, frames, 3] float32 in 0..1 (ComfyUI IMAGE) on the input's device, N = max(1, ceil(length /
    window_samples)), and ``length``, the sound's length in samples at the preset's rate (an int).
    """
    p = get_preset(preset)
    x = resample(_as_channels(waveform, channels), int(sample_rate), p.sample_rate)
    length = int(x.shape[-1])
    n = max(1, -(-length // p.window_samples))
    x = F.pad(x.float() * p.gain, (0, n * p.window_samples - length))
    mel = _mel_columns(x, p)  # [C, n_mels, n * frames]
    C = mel.shape[0]
    mel = mel.reshape(C, p.n_mels, n, p.frames).permute(2, 0, 1, 3)
    return _encode(mel, p), length


def is_stereo(pictures: torch.Tensor) -> bool:
    """Whether pictures carry stereo as Riffusion's: R near 0 (under a tenth of G's or B's mean) while G or B is not."""
    means = pictures[..., :3].float().mean(dim=(0, 1, 2))
    gb = float(torch.maximum(means[1], means[2]))
    return gb > 1.0 / 255.0 and float(means[0]) < 0.1 * gb


def _decode(pictures: torch.Tensor, p: Preset, stereo: bool) -> torch.Tensor:
    """Pictures [n, n_mels, W, 3] -> mel amplitudes [n, C, n_mels, W]: mono reads the mean of R, G and B (R itself
    for a grey picture, as Riffusion reads), stereo reads G and B."""
    x = pictures.float().clamp(0.0, 1.0).permute(0, 3, 1, 2)
    v = x[:, 1:3] if stereo else x.mean(1, keepdim=True)
    v = v.flip(2)
    if p.loud_dark:
        v = 1.0 - v
    if p.mapping == "db":
        floor = 10.0 ** (p.db_min / 20.0)
        return (10.0 ** ((p.db_min + v * (p.db_max - p.db_min)) / 20.0) - floor).clamp_min(0.0)
    return v ** (1.0 / p.power) * p.max_value


def griffin_lim(magnitude: torch.Tensor, preset: Preset | str, iterations: int, generator: torch.Generator,
                length: int) -> torch.Tensor:
    """Fast Griffin-Lim: linear magnitudes [B, n_fft//2+1, T] -> waves [B, length] (length ~ (T - 1) * hop).

    Start phase uniform in [0, 2 pi) drawn on the CPU from ``generator`` (the same on every device); then
    ``iterations`` times: ``c = stft(istft(|S| e^{i phase}))``, ``phase = angle(c - MOMENTUM / (1 + MOMENTUM) *
    c_prev)``, with the preset's ``torch.stft`` settings.
    """
    p = get_preset(preset)
    start = torch.rand(magnitude.shape, generator=generator, dtype=torch.float32).to(magnitude.device)
    angles = torch.polar(torch.ones_like(magnitude), 2.0 * math.pi * start)
    spec, prev = torch.empty_like(angles), None
    for _ in range(int(iterations)):  # in place where it can: Riffusion's spectra are ~20 MB per channel-picture
        rebuilt = _stft(_istft(torch.mul(angles, magnitude, out=spec), p, length), p, center=True)
        if prev is None:
            angles.copy_(rebuilt)
        else:
            torch.sub(rebuilt, prev, alpha=MOMENTUM / (1.0 + MOMENTUM), out=angles)
        angles.div_(angles.abs().clamp_min_(1e-16))
        prev = rebuilt
    return _istft(torch.mul(angles, magnitude, out=spec), p, length)


def _with_context(mel: torch.Tensor, ctx: int, join: str) -> torch.Tensor:
    """[n, C, H, W] -> [n, C, H, W + 2 ctx]: each picture with ``ctx`` columns each side, its neighbours' when
    joined, its own edge column repeated at the ends of the sound (and everywhere for ``"batch"``)."""
    n, C, H, W = mel.shape
    if join == "batch":
        return F.pad(mel.reshape(n * C, H, W), (ctx, ctx), mode="replicate").reshape(n, C, H, W + 2 * ctx)
    flat = F.pad(mel.permute(1, 2, 0, 3).reshape(C, H, n * W), (ctx, ctx), mode="replicate")
    return flat.unfold(-1, W + 2 * ctx, W).permute(2, 0, 1, 3)


def _rebuild(mel: torch.Tensor, p: Preset, iterations: int, seed: int, ctx: int, keep: tuple[int, int]) -> torch.Tensor:
    """Context mel [n, C, H, W + 2 ctx] -> waves [n, C, keep[1] - keep[0]]: pseudo-inverse and Griffin-Lim a group
    of pictures at a time (group size depends on shapes only, so a seed gives the same sound on every device)."""
    n, C, H, cols = mel.shape
    pinv = _pseudo_inverse(p, mel.device)
    generator = torch.Generator().manual_seed(int(seed))
    group = max(1, _BUDGET // (C * p.n_freqs * cols))
    out = []
    for s in range(0, n, group):
        part = mel[s: s + group].reshape(-1, H, cols)
        lin = torch.matmul(pinv, part).clamp_min(0.0)
        wave = griffin_lim(lin, p, iterations, generator, (cols - 1) * p.hop)
        out.append(wave[:, keep[0]: keep[1]].reshape(-1, C, keep[1] - keep[0]))
    return torch.cat(out, 0)


def _crossfade(parts: torch.Tensor, step: int, half: int) -> torch.Tensor:
    """[n, C, step + 2 half] windows overlapping by 2 half samples -> [C, n * step]: raised-cosine fades (sin^2 in,
    cos^2 out, summing to 1) centred on each boundary; the outer half-fades of the first and last are cut off."""
    n, C, seg = parts.shape
    t = (torch.arange(2 * half, device=parts.device, dtype=parts.dtype) + 0.5) / (2 * half)
    fade_in = torch.sin(0.5 * math.pi * t) ** 2
    out = parts.new_zeros(C, n * step + 2 * half)
    for i in range(n):
        env = torch.ones(seg, device=parts.device, dtype=parts.dtype)
        if half and i > 0:
            env[: 2 * half] = fade_in
        if half and i < n - 1:
            env[seg - 2 * half:] = 1.0 - fade_in
        out[:, i * step: i * step + seg] += parts[i] * env
    return out[:, half: half + n * step]


def to_audio(pictures: torch.Tensor, preset: Preset | str, iterations: int = 32, seed: int = 0,
             join: str = "concatenate", length: int | None = None, stereo: bool | None = None) -> torch.Tensor:
    """Spectrogram pictures [N, n_mels, W, 3] (0..1, as :func:`to_pictures` makes; any width W) -> sound at the
    preset's rate, float32 on the pictures' device.

    ``iterations`` of fast Griffin-Lim from a start phase seeded by ``seed`` (deterministic for a seed). ``join``:
    ``"concatenate"`` -> [C, N * W * hop] with crossfaded joins, trimmed (or padded with silence) to ``length`` when
    given; ``"batch"`` -> [N, C, W * hop], each picture on its own (``length`` ignored). C = 2 when the pictures
    carry stereo (:func:`is_stereo`, or ``stereo`` when given), else 1. ``preset.peak`` scales the result (each
    item for "batch") to that peak.
    """
    p = get_preset(preset)
    if join not in JOINS:
        raise ValueError(f"join must be one of {JOINS}, got {join!r}")
    if pictures.dim() == 3:
        pictures = pictures[None]
    if pictures.dim() != 4 or pictures.shape[1] != p.n_mels or pictures.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{p.name} pictures must be [N, {p.n_mels}, W, 3], got {tuple(pictures.shape)}")
    pictures = pictures[..., :3].expand(-1, -1, -1, 3)
    mel = _decode(pictures, p, is_stereo(pictures) if stereo is None else bool(stereo))
    W = mel.shape[-1]
    half = min(p.crossfade, W * p.hop) // 2 if join == "concatenate" else 0
    ctx = -(-(half + p.win_length // 2) // p.hop) + 1
    keep = (ctx * p.hop - half, (ctx + W) * p.hop + half)
    parts = _rebuild(_with_context(mel, ctx, join), p, iterations, seed, ctx, keep) / p.gain
    if join == "batch":
        out = parts
    else:
        out = _crossfade(parts, W * p.hop, half)
        if length is not None:
            out = F.pad(out, (0, max(0, int(length) - out.shape[-1])))[:, : int(length)]
    if p.peak is not None:
        top = out.abs().amax(dim=(-2, -1), keepdim=True)
        out = out * torch.where(top > 1e-12, p.peak / top.clamp_min(1e-12), torch.ones_like(top))
    return out.float().contiguous()
