"""Synthetic smart-speaker households speaking keywords: generated with espeak-ng, never downloaded.

Every household is drawn from ``numpy.random.default_rng([seed, index])``, so any household can be
made on its own, in any order, and comes out the same (:data:`GENERATOR_VERSION` names the recipe).

A household has:

* one to three **speakers**. Each is an espeak-ng English accent, a voice variant, a pitch (25-75)
  and a speed (125-185 words per minute). Training households draw variants from
  :data:`TRAIN_VARIANTS`; the held-out test speakers use :data:`HELD_OUT_VARIANTS`, which no
  household trains on;
* its own **word frequencies**, Dirichlet(0.8) over the :data:`KEYWORDS`. Some households hardly
  ever say "left";
* its own **room**: reverberation (an exponentially decaying noise impulse response, RT60
  0.05-0.5 s) and background noise (white, pink, mains hum or babble), at a signal-to-noise
  ratio of 10 to 30 dB;
* 24 to 48 utterances. Each one is a speaker's clean token with its own tempo change (plus or
  minus 8 %), gain and position in a 1.5-second clip, then the room and the noise.

Utterances are turned into features with :mod:`models.audio`, the same code a device runs.
Each household's features are cached on disk as an ``.npz``. Audio is not kept, because
1,000 households of audio would take a gigabyte; :func:`utterance` re-creates any one clip.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.audio import SAMPLE_RATE, Audio, features, read_wav, resample
from models.datasets import Dataset

GENERATOR_VERSION = 1
KEYWORDS = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-029")
TRAIN_VARIANTS = (
    "m1", "m2", "m3", "m4", "m5", "m6", "f1", "f2", "f3", "f4", "adam", "Andy", "anika", "aunty",
    "belinda", "benjamin", "boris", "caleb", "david", "ed", "edward", "Gene", "grandma", "grandpa",
    "Hugo", "iven", "Jacky", "john", "Lee", "linda", "Marco", "max", "Mike", "norbert", "paul",
    "pedro", "quincy", "rob", "robert", "shelby", "steph", "travis", "victor", "zac",
)  # fmt: skip
HELD_OUT_VARIANTS = (
    "m7", "m8", "f5", "Alicia", "Andrea", "Annie", "Denis", "edward2", "iven2", "steph2", "michel", "miguel",
)  # fmt: skip
NOISES = ("white", "pink", "hum", "babble")
TEST_SPEAKERS = 40
TEST_TAKES = 3
CLIP_SECONDS = 1.5


class SpeechUnavailable(RuntimeError):
    """espeak-ng is not installed: ``apt-get install espeak-ng`` (Debian, Raspberry Pi OS)."""


class SynthesisFailed(ValueError):
    """espeak-ng refused a word or voice (its own message is kept): a caller's bad argument."""


@dataclass(frozen=True)
class Speaker:
    """One espeak-ng voice: ``espeak-ng -v {accent}+{variant} -p {pitch} -s {speed}``."""

    accent: str
    variant: str
    pitch: int
    speed: int

    @property
    def voice(self) -> str:
        """The ``-v`` argument."""
        return f"{self.accent}+{self.variant}"


@dataclass(frozen=True)
class Room:
    """Reverberation and background noise of one household."""

    rt60: float
    wet: float
    noise: str
    snr_db: float


@dataclass(frozen=True)
class Household:
    """The recipe of one household: speakers, room, and which words it says how often."""

    index: int
    speakers: tuple[Speaker, ...]
    room: Room
    word_probs: tuple[float, ...]
    utterances: int


def espeak_binary() -> str:
    """The espeak-ng executable, or :class:`SpeechUnavailable` naming the package to install."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise SpeechUnavailable(
            "the speech data set is synthesised with espeak-ng, which is not installed: "
            "apt-get install espeak-ng (Debian, Ubuntu, Raspberry Pi OS)"
        )
    return path


def synthesize(word: str, speaker: Speaker) -> Audio:
    """One clean token of ``word`` in ``speaker``'s voice at 16 kHz, leading and trailing silence trimmed."""
    done = subprocess.run(
        [espeak_binary(), "-v", speaker.voice, "-p", str(speaker.pitch), "-s", str(speaker.speed), "--stdout", word],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0 or not done.stdout:
        why = done.stderr.decode(errors="replace").strip()[:300] or f"exit status {done.returncode}"
        raise SynthesisFailed(f"espeak-ng could not say {word!r} in voice {speaker.voice!r}: {why}")
    out = done.stdout
    # espeak-ng streams its WAV to stdout, so the header's length fields are placeholders.
    audio, rate = read_wav(_fix_streamed_wav(out))
    audio = resample(audio, rate, SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * max(float(np.abs(audio).max()), 1e-9))
    if len(loud) == 0:
        raise RuntimeError(f"espeak-ng produced silence for {word!r} in voice {speaker.voice}")
    return audio[loud[0] : loud[-1] + 1] / max(float(np.abs(audio).max()), 1e-9)


def _fix_streamed_wav(data: bytes) -> bytes:
    """Patch the RIFF and data chunk sizes of a WAV written to a pipe (they say 0x7ffff...)."""
    if len(data) < 44 or data[:4] != b"RIFF":
        raise RuntimeError("espeak-ng did not write a WAV")
    pos = data.find(b"data", 12)
    if pos < 0:
        raise RuntimeError("espeak-ng's WAV has no data chunk")
    size = len(data) - pos - 8
    size -= size % 2
    fixed = bytearray(data[: pos + 8 + size])
    fixed[4:8] = (len(fixed) - 8).to_bytes(4, "little")
    fixed[pos + 4 : pos + 8] = size.to_bytes(4, "little")
    return bytes(fixed)


def household(index: int, seed: int = 0) -> Household:
    """The recipe of training household ``index`` (deterministic in ``seed`` and ``index``)."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, index])
    speakers = tuple(_speaker(rng, TRAIN_VARIANTS) for _ in range(int(rng.integers(1, 4))))
    room = Room(
        rt60=float(rng.uniform(0.05, 0.5)),
        wet=float(rng.uniform(0.1, 0.5)),
        noise=str(rng.choice(NOISES)),
        snr_db=float(rng.uniform(10.0, 30.0)),
    )
    probs = rng.dirichlet(np.full(len(KEYWORDS), 0.8))
    return Household(index, speakers, room, tuple(float(p) for p in probs), int(rng.integers(24, 49)))


def _speaker(rng: np.random.Generator, variants: Sequence[str]) -> Speaker:
    return Speaker(
        accent=str(rng.choice(ACCENTS)),
        variant=str(rng.choice(list(variants))),
        pitch=int(rng.integers(25, 76)),
        speed=int(rng.integers(125, 186)),
    )


def held_out_speakers(seed: int = 0) -> tuple[Speaker, ...]:
    """The held-out speakers: voice variants no training household uses."""
    rng = np.random.default_rng([seed, GENERATOR_VERSION, 1 << 30])
    return tuple(_speaker(rng, HELD_OUT_VARIANTS) for _ in range(TEST_SPEAKERS))


def _noise(kind: str, n: int, rng: np.random.Generator, babble: Sequence[Audio]) -> Audio:
    if kind == "white":
        out = rng.standard_normal(n)
    elif kind == "pink":  # 1/f power: shape white noise's spectrum by 1/sqrt(f)
        spec = np.fft.rfft(rng.standard_normal(n))
        spec[1:] /= np.sqrt(np.arange(1, len(spec)))
        out = np.fft.irfft(spec, n=n)
    elif kind == "hum":  # mains hum and harmonics, plus a little hiss
        t = np.arange(n) / SAMPLE_RATE
        f0 = 50.0 if rng.random() < 0.5 else 60.0
        out = 0.05 * rng.standard_normal(n)
        for h in (1, 2, 3, 5):
            out += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h
    else:  # babble: other tokens, overlapping, at random offsets
        out = np.zeros(n)
        for _ in range(4):
            tok = babble[int(rng.integers(len(babble)))]
            start = int(rng.integers(-len(tok) // 2, n))
            lo, hi = max(start, 0), min(start + len(tok), n)
            if hi > lo:
                out[lo:hi] += tok[lo - start : hi - start]
    out = np.asarray(out, dtype=np.float64)
    return (out / max(float(np.sqrt(np.mean(out**2))), 1e-9)).astype(np.float32)


def _reverb(audio: Audio, room: Room, rng: np.random.Generator) -> Audio:
    n = max(1, int(room.rt60 * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    ir = rng.standard_normal(n) * np.exp(-6.9078 * t / room.rt60)  # -60 dB at rt60
    ir /= max(float(np.sqrt(np.sum(ir**2))), 1e-9)
    size = len(audio) + n - 1
    nfft = 1 << (size - 1).bit_length()
    wet = np.fft.irfft(np.fft.rfft(audio, nfft) * np.fft.rfft(ir, nfft), nfft)[: len(audio)]
    return ((1 - room.wet) * audio + room.wet * wet).astype(np.float32)


def _render(
    token: Audio, room: Room, rng: np.random.Generator, babble: Sequence[Audio], snr_jitter: float = 3.0
) -> Audio:
    """One utterance: tempo change, placement in a 1.5 s clip, gain, reverberation, noise."""
    stretch = float(rng.uniform(0.92, 1.08))
    tok = resample(token, SAMPLE_RATE, round(SAMPLE_RATE * stretch))  # played back at 16 kHz: tempo and pitch move
    n = int(CLIP_SECONDS * SAMPLE_RATE)
    tok = tok[: n - 1]
    clip = np.zeros(n, dtype=np.float32)
    start = int(rng.integers(0, n - len(tok)))
    clip[start : start + len(tok)] = tok * float(rng.uniform(0.3, 1.0))
    clip = _reverb(clip, room, rng)
    signal_rms = float(np.sqrt(np.mean(clip[start : start + len(tok)] ** 2)))
    snr = room.snr_db + float(rng.uniform(-snr_jitter, snr_jitter))
    noisy = clip + _noise(room.noise, n, rng, babble) * signal_rms * 10 ** (-snr / 20)
    return (noisy / max(1.0, float(np.abs(noisy).max()))).astype(np.float32)


def _tokens(speakers: Sequence[Speaker]) -> dict[tuple[int, int], Audio]:
    return {(s, w): synthesize(word, sp) for s, sp in enumerate(speakers) for w, word in enumerate(KEYWORDS)}


def household_audio(h: Household, seed: int = 0) -> tuple[list[Audio], npt.NDArray[np.int64]]:
    """All utterances of household ``h`` as 1.5 s clips at 16 kHz, and their keyword labels."""
    tokens = _tokens(h.speakers)
    rng = np.random.default_rng([seed, GENERATOR_VERSION, h.index, 1])
    labels = rng.choice(len(KEYWORDS), size=h.utterances, p=np.asarray(h.word_probs) / sum(h.word_probs))
    babble = list(tokens.values())
    clips = []
    for w in labels:
        s = int(rng.integers(len(h.speakers)))
        clips.append(_render(tokens[(s, int(w))], h.room, rng, babble))
    return clips, labels.astype(np.int64)


def utterance(index: int, k: int, seed: int = 0) -> tuple[Audio, str]:
    """The ``k``-th utterance of training household ``index`` as audio, and its keyword."""
    clips, labels = household_audio(household(index, seed), seed)
    return clips[k], KEYWORDS[int(labels[k])]


def held_out_audio(seed: int = 0) -> tuple[list[Audio], npt.NDArray[np.int64]]:
    """Held-out utterances: every keyword by every test speaker, ``TEST_TAKES`` takes each, in varied rooms."""
    speakers = held_out_speakers(seed)
    rng = np.random.default_rng([seed, GENERATOR_VERSION, 1 << 30, 1])
    clips: list[Audio] = []
    labels: list[int] = []
    for s, sp in enumerate(speakers):
        tokens = {w: synthesize(word, sp) for w, word in enumerate(KEYWORDS)}
        room = Room(
            rt60=float(rng.uniform(0.05, 0.5)),
            wet=float(rng.uniform(0.1, 0.5)),
            noise=NOISES[s % len(NOISES)],
            snr_db=float(rng.uniform(10.0, 30.0)),
        )
        for w in range(len(KEYWORDS)):
            for _ in range(TEST_TAKES):
                clips.append(_render(tokens[w], room, rng, list(tokens.values())))
                labels.append(w)
    return clips, np.array(labels, dtype=np.int64)


def cache_dir() -> Path:
    """Where features are cached: ``$FEDMQ_CACHE/speech``, else ``$XDG_CACHE_HOME/fedmq/speech`` or ``~/.cache``."""
    root = os.environ.get("FEDMQ_CACHE")
    if root:
        return Path(root) / "speech"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "fedmq" / "speech"


def _espeak_tag() -> str:
    """Cache key part for the synthesiser itself: another espeak-ng build may sound different."""
    try:
        out = subprocess.run([espeak_binary(), "--version"], capture_output=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return hashlib.sha256(out).hexdigest()[:8]


def _cached(name: str, seed: int, make: Callable[[], Dataset]) -> Dataset:
    folder = cache_dir() / f"v{GENERATOR_VERSION}-{_espeak_tag()}-seed{seed}"
    path = folder / f"{name}.npz"
    if path.is_file():
        with np.load(path, allow_pickle=False) as f:
            return Dataset(f["x"], f["y"])
    data = make()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, x=data.x, y=data.y)
    os.replace(tmp, path)
    return data


def _featurise(clips: Sequence[Audio], labels: npt.NDArray[np.int64]) -> Dataset:
    x = np.stack([features(c) for c in clips]) if clips else np.zeros((0, 196), dtype=np.float32)
    return Dataset(x.astype(np.float32), labels.astype(np.int64))


def household_features(index: int, seed: int = 0) -> Dataset:
    """Features and labels of training household ``index`` (cached)."""
    return _cached(f"household-{index:05d}", seed, lambda: _featurise(*household_audio(household(index, seed), seed)))


def held_out_set(seed: int = 0) -> Dataset:
    """The held-out voices' features (cached): 40 speakers x 10 keywords x 3 takes = 1,200 utterances."""
    return _cached("test", seed, lambda: _featurise(*held_out_audio(seed)))


def households(count: int, seed: int = 0, workers: int | None = None) -> list[Dataset]:
    """Training households ``0 .. count - 1``; espeak-ng runs in parallel for the ones not cached."""
    if count < 1:
        raise ValueError(f"need at least one household, got {count}")
    espeak_binary()
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda i: household_features(i, seed), range(count)))
