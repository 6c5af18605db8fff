"""Band-limited resampling by a Kaiser-windowed sinc, in torch alone (no torchaudio, scipy or librosa).

Output sample ``k`` sits at input position ``t = k * from_rate / to_rate`` and is ``sum_n x[n] h(t - n)`` with

    h(u) = r * sinc(r * u) * kaiser(u / half, BETA),   r = ROLLOFF * min(1, to_rate / from_rate),
    half = ceil(ZEROS / r) input samples (ZEROS zero crossings of the sinc on each side).

So the low-pass cuts at ``ROLLOFF`` (0.9) of the lower Nyquist frequency and the Kaiser window (beta 8.6, about
86 dB side lobes) makes the stop band start just under it: tones above the new Nyquist frequency are removed
rather than folded back. Samples outside the input count as silence. The output has ``ceil(T * to / from)``
samples; equal rates return the input unchanged.

Rates are reduced by their gcd to ``L`` input steps per ``M`` output steps; while the ``M`` phase kernels fit in
a small table, one strided ``conv1d`` computes every phase at once (polyphase). For unusual rate pairs (huge
``M``) each output sample's taps are gathered in chunks instead. Both run on the input's device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: zero crossings of the sinc on each side of the kernel's centre
ZEROS = 32
#: cut-off as a fraction of the lower of the two Nyquist frequencies
ROLLOFF = 0.9
#: Kaiser window shape (8.6 ~ 86 dB stop-band attenuation)
BETA = 8.6
#: most kernel entries held at once (polyphase table, or one gathered chunk)
_BUDGET = 1 << 22


def _kernel(u: torch.Tensor, r: float, half: int) -> torch.Tensor:
    """``h(u)`` of the module docstring for offsets ``u`` in input samples (float64), zero for ``|u| >= half``."""
    inside = (u / half).clamp(-1.0, 1.0)
    window = torch.special.i0(BETA * torch.sqrt(1.0 - inside * inside)) / torch.special.i0(
        torch.tensor(BETA, dtype=u.dtype, device=u.device))
    return torch.where(u.abs() < half, r * torch.sinc(r * u) * window, torch.zeros_like(u))


def _polyphase(x: torch.Tensor, L: int, M: int, r: float, half: int, n_out: int) -> torch.Tensor:
    """[B, T] -> [B, n_out]: phase ``p`` of output block ``q`` is ``sum_i xpad[q*L + i] * h(p*L/M - (i - half))``."""
    taps = 2 * half + L + 1
    phase = torch.arange(M, dtype=torch.float64, device=x.device)[:, None] * L / M
    offset = torch.arange(taps, dtype=torch.float64, device=x.device)[None, :] - half
    table = _kernel(phase - offset, r, half).to(x.dtype)  # [M, taps]
    blocks = -(-n_out // M)
    need = (blocks - 1) * L + taps
    xpad = F.pad(x, (half, max(0, need - x.shape[-1] - half)))
    out = F.conv1d(xpad[:, None, :], table[:, None, :], stride=L)[:, :, :blocks]  # [B, M, blocks]
    return out.transpose(1, 2).reshape(x.shape[0], blocks * M)[:, :n_out]


def _gathered(x: torch.Tensor, L: int, M: int, r: float, half: int, n_out: int) -> torch.Tensor:
    """[B, T] -> [B, n_out] by gathering each output sample's ``2 * half + 2`` taps (any rate pair)."""
    B, T = x.shape
    j = torch.arange(-half, half + 2, device=x.device)
    xpad = F.pad(x, (half + 1, half + 2))
    step = max(1, _BUDGET // (j.numel() * max(1, B)))
    outs = []
    for start in range(0, n_out, step):
        k = torch.arange(start, min(n_out, start + step), device=x.device, dtype=torch.int64)
        base = k * L // M  # exact integer floor of the input position
        frac = (k * L - base * M).to(torch.float64) / M
        idx = (base[:, None] + j[None, :] + half + 1).clamp(0, xpad.shape[-1] - 1)
        weights = _kernel(frac[:, None] - j[None, :].to(torch.float64), r, half).to(x.dtype)
        outs.append((xpad[:, idx] * weights).sum(-1))
    return torch.cat(outs, dim=-1) if outs else x.new_zeros(B, 0)


def resample(wave: torch.Tensor, from_rate: int, to_rate: int) -> torch.Tensor:
    """Resample ``wave`` [..., T] from ``from_rate`` to ``to_rate`` Hz along its last axis (see the module docstring).

    Returns [..., ceil(T * to_rate / from_rate)] in the input's floating dtype (float32 for integer input) on its
    device; the input itself when the rates are equal.
    """
    from_rate, to_rate = int(from_rate), int(to_rate)
    if from_rate <= 0 or to_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {from_rate} -> {to_rate}")
    if from_rate == to_rate:
        return wave
    if not wave.is_floating_point():
        wave = wave.float()
    g = math.gcd(from_rate, to_rate)
    L, M = from_rate // g, to_rate // g
    r = ROLLOFF * min(1.0, M / L)
    half = math.ceil(ZEROS / r)
    T = wave.shape[-1]
    n_out = -(-T * M // L)
    if T == 0:
        return wave.new_zeros(*wave.shape[:-1], 0)
    x = wave.reshape(-1, T)
    if M * (2 * half + L + 1) <= _BUDGET:
        y = _polyphase(x, L, M, r, half, n_out)
    else:
        y = _gathered(x, L, M, r, half, n_out)
    return y.reshape(*wave.shape[:-1], n_out)
