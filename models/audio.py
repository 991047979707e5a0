"""Keyword-spotting features on the device: numpy only (no torch, no scipy).

The pipeline, which a device in any language can reproduce from ``docs/protocol.md``:

1. mono 16-bit PCM WAV at any rate, resampled to 16 kHz (:func:`resample`, band-limited, by FFT);
2. the loudest one-second window (:func:`loudest_second`), zero-padded when shorter;
3. a log-mel spectrogram (:func:`log_mel`): Hann window of 2,048 samples (128 ms), hop 1,024
   (64 ms), 14 frames; power spectrum; 14 triangular mel filters (HTK mel scale) between 60 and
   7,600 Hz; ``10 log10(E + 1e-10)`` dB;
4. normalised per utterance to [0, 1]: ``clip((dB - max(dB) + 40) / 40, 0, 1)`` (loudness-invariant);
5. laid out as a 14 x 14 image, row = mel band (0 lowest), column = frame, flattened row-major.
"""

from __future__ import annotations

import io
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16_000
CLIP_SAMPLES = SAMPLE_RATE  # one second
N_FFT = 2048
HOP = 1024
N_MELS = 14
N_FRAMES = 1 + (CLIP_SAMPLES - N_FFT) // HOP  # 14
F_MIN, F_MAX = 60.0, 7600.0
DYNAMIC_RANGE_DB = 40.0
NUM_FEATURES = N_MELS * N_FRAMES  # 196

Audio = npt.NDArray[np.float32]


def read_wav(source: str | Path | bytes) -> tuple[Audio, int]:
    """Decode a PCM WAV (8, 16 or 32-bit integer; channels averaged) into float32 in [-1, 1] and its rate.

    Raises:
        ValueError: not a PCM WAV this reader understands, or no samples.
    """
    try:
        with wave.open(io.BytesIO(source) if isinstance(source, bytes) else str(source), "rb") as f:
            width, channels, rate = f.getsampwidth(), f.getnchannels(), f.getframerate()
            raw = f.readframes(f.getnframes())
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"not a PCM WAV file: {exc}") from None
    if width not in (1, 2, 4):
        raise ValueError(f"WAV sample width {8 * width} bits is not supported (8, 16 or 32-bit PCM)")
    usable = len(raw) - len(raw) % (width * channels)
    if usable == 0:
        raise ValueError("the WAV file holds no samples")
    if width == 1:
        pcm = (np.frombuffer(raw[:usable], dtype=np.uint8).astype(np.float32) - 128.0) / 128.0
    else:
        dtype = np.int16 if width == 2 else np.int32
        pcm = np.frombuffer(raw[:usable], dtype=dtype).astype(np.float32) / float(np.iinfo(dtype).max)
    return pcm.reshape(-1, channels).mean(axis=1).astype(np.float32), rate


def wav_bytes(audio: Audio, rate: int = SAMPLE_RATE) -> bytes:
    """Encode float audio in [-1, 1] as a mono 16-bit PCM WAV."""
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes(pcm.tobytes())
    return buf.getvalue()


def resample(audio: Audio, rate: int, target: int = SAMPLE_RATE) -> Audio:
    """Band-limited resampling by zero-padding or truncating the spectrum (numpy's real FFT)."""
    if rate <= 0:
        raise ValueError(f"sample rate must be > 0, got {rate}")
    if rate == target or len(audio) == 0:
        return np.asarray(audio, dtype=np.float32)
    n_out = max(1, round(len(audio) * target / rate))
    spectrum = np.fft.rfft(audio.astype(np.float64))
    bins = n_out // 2 + 1
    if bins <= len(spectrum):
        spectrum = spectrum[:bins]
    else:
        spectrum = np.concatenate([spectrum, np.zeros(bins - len(spectrum), dtype=spectrum.dtype)])
    out = np.fft.irfft(spectrum, n=n_out) * (n_out / len(audio))
    return out.astype(np.float32)


def loudest_second(audio: Audio) -> Audio:
    """The one-second window of greatest energy (10 ms steps), zero-padded to exactly 16,000 samples."""
    if len(audio) <= CLIP_SAMPLES:
        out = np.zeros(CLIP_SAMPLES, dtype=np.float32)
        start = (CLIP_SAMPLES - len(audio)) // 2
        out[start : start + len(audio)] = audio
        return out
    energy = np.concatenate([[0.0], np.cumsum(audio.astype(np.float64) ** 2)])
    starts = np.arange(0, len(audio) - CLIP_SAMPLES + 1, SAMPLE_RATE // 100)
    best = int(starts[np.argmax(energy[starts + CLIP_SAMPLES] - energy[starts])])
    return np.ascontiguousarray(audio[best : best + CLIP_SAMPLES], dtype=np.float32)


def _hz_to_mel(f: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 2595.0 * np.log10(1.0 + f / 700.0)


def _mel_to_hz(m: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


@lru_cache(maxsize=1)
def mel_filterbank() -> npt.NDArray[np.float64]:
    """``(N_MELS, N_FFT // 2 + 1)`` triangular filters, peak 1, edges equally spaced in HTK mel."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.array(F_MIN)), _hz_to_mel(np.array(F_MAX)), N_MELS + 2))
    freqs = np.arange(N_FFT // 2 + 1) * SAMPLE_RATE / N_FFT
    bank = np.zeros((N_MELS, len(freqs)))
    for m in range(N_MELS):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / (mid - lo)
        falling = (hi - freqs) / (hi - mid)
        bank[m] = np.clip(np.minimum(rising, falling), 0.0, None)
    bank.setflags(write=False)
    return bank


def log_mel(clip: Audio) -> npt.NDArray[np.float32]:
    """Normalised log-mel features of a one-second clip, shape ``(N_MELS, N_FRAMES)``, values in [0, 1]."""
    if clip.shape != (CLIP_SAMPLES,):
        raise ValueError(f"need a clip of {CLIP_SAMPLES} samples, got shape {clip.shape}")
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    frames = np.stack([clip[i * HOP : i * HOP + N_FFT] for i in range(N_FRAMES)]).astype(np.float64)
    power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2  # (frames, bins)
    db = 10.0 * np.log10(mel_filterbank() @ power.T + 1e-10)  # (mels, frames)
    out: npt.NDArray[np.float32] = np.clip((db - db.max() + DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB, 0.0, 1.0).astype(
        np.float32
    )
    return out


def features(audio: Audio, rate: int = SAMPLE_RATE) -> npt.NDArray[np.float32]:
    """The whole device pipeline: resample, loudest second, log-mel, flattened to 196 values."""
    out: npt.NDArray[np.float32] = log_mel(loudest_second(resample(audio, rate))).reshape(-1)
    return out


def wav_features(source: str | Path | bytes) -> npt.NDArray[np.float32]:
    """:func:`features` of a WAV file, shape ``(196,)``."""
    audio, rate = read_wav(source)
    return features(audio, rate)
