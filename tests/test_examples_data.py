"""The examples' data: keyword features (numpy oracles), the espeak-ng households, the hospitals."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmq.config import AggregatorConfig
from fedmq.errors import ConfigError, DecodeError
from fedmq.messages import ModelSpec
from models import audio, medical
from models.datasets import digits, range_mismatch

SR = audio.SAMPLE_RATE


def tone(freq: float, seconds: float, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- features: numpy oracles ---------------------------------------------------------------


def test_wav_round_trip_and_channel_mixing() -> None:
    x = tone(440, 0.3)
    back, rate = audio.read_wav(audio.wav_bytes(x))
    assert rate == SR and len(back) == len(x)
    assert np.max(np.abs(back - x)) < 1.0 / 32767 + 1e-6


def test_read_wav_refuses_what_is_not_a_wav() -> None:
    with pytest.raises(ValueError, match="not a PCM WAV"):
        audio.read_wav(b"RIFF....not a wave file at all")
    with pytest.raises(ValueError, match="no samples"):
        audio.read_wav(audio.wav_bytes(np.zeros(0, dtype=np.float32)))


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_resample_keeps_the_frequency(rate: int) -> None:
    y = audio.resample(tone(1000, 1.0, rate), rate, SR)
    assert abs(len(y) - SR) <= 1
    peak = np.argmax(np.abs(np.fft.rfft(y))) * SR / len(y)
    assert abs(peak - 1000) < 2


def test_loudest_second_finds_the_word_and_pads_short_clips() -> None:
    x = np.zeros(3 * SR, dtype=np.float32)
    x[int(1.7 * SR) : int(2.0 * SR)] = tone(500, 0.3)
    clip = audio.loudest_second(x)
    assert clip.shape == (SR,) and np.sum(clip**2) == pytest.approx(np.sum(x**2), rel=1e-3)
    short = audio.loudest_second(tone(500, 0.2))
    assert short.shape == (SR,) and np.sum(short**2) == pytest.approx(np.sum(tone(500, 0.2) ** 2), rel=1e-6)


def test_mel_filterbank_matches_the_documented_layout() -> None:
    bank = audio.mel_filterbank()
    assert bank.shape == (14, 1025)
    centres = np.argmax(bank, axis=1) * SR / audio.N_FFT
    assert np.all(np.diff(centres) > 0) and 60 < centres[0] < 300 and 5000 < centres[-1] < 7600
    assert np.all(bank.max(axis=1) > 0.5) and bank.min() >= 0


def test_log_mel_oracle_shape_range_and_where_a_tone_lands() -> None:
    clip = audio.loudest_second(tone(2000, 1.0))
    f = audio.log_mel(clip)
    assert f.shape == (14, 14) and f.dtype == np.float32 and f.min() >= 0 and f.max() == 1.0
    # The loudest band is the one whose filter peaks nearest 2 kHz.
    band = int(np.argmax(audio.mel_filterbank()[:, round(2000 * audio.N_FFT / SR)]))
    assert np.all(np.argmax(f, axis=0) == band)
    # Oracle: the same numbers from a direct computation of the documented recipe.
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(audio.N_FFT) / audio.N_FFT)
    frames = [clip[i * 1024 : i * 1024 + 2048] * window for i in range(14)]
    db = 10 * np.log10(audio.mel_filterbank() @ (np.abs(np.fft.rfft(frames, axis=1)) ** 2).T + 1e-10)
    assert np.allclose(f, np.clip((db - db.max() + 40) / 40, 0, 1), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(gain=st.floats(0.01, 1.0), seed=st.integers(0, 1000))
def test_features_do_not_depend_on_loudness(gain: float, seed: int) -> None:
    x = np.random.default_rng(seed).standard_normal(SR).astype(np.float32) * 0.1 + tone(700, 1.0)
    assert np.allclose(audio.features(x), audio.features(x * np.float32(gain)), atol=1e-4)


def test_features_of_silence_are_finite() -> None:
    f = audio.features(np.zeros(SR, dtype=np.float32))
    assert f.shape == (196,) and np.isfinite(f).all()


# --- the speech households (espeak-ng) ------------------------------------------------------


def test_households_are_deterministic_and_cached(speech_cache: str, tmp_path: Path) -> None:
    from models import speech

    assert speech.household(3) == speech.household(3)
    assert speech.household(3) != speech.household(3, seed=1)
    first = speech.household_features(3)
    assert (speech.cache_dir() / next(p.name for p in speech.cache_dir().iterdir())).is_dir()
    os.environ["FEDMQ_CACHE"] = str(tmp_path)  # a second, empty cache: generated again from scratch
    try:
        again = speech.household_features(3)
    finally:
        os.environ["FEDMQ_CACHE"] = speech_cache
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    assert first.x.shape[1] == 196 and 24 <= len(first) <= 48
    assert first.x.min() >= 0 and first.x.max() <= 1


def test_households_are_non_iid_and_test_voices_are_held_out(speech_cache: str) -> None:
    from models import speech

    assert not set(speech.TRAIN_VARIANTS) & set(speech.HELD_OUT_VARIANTS)
    hs = [speech.household(i) for i in range(200)]
    used = {s.variant for h in hs for s in h.speakers}
    assert used <= set(speech.TRAIN_VARIANTS)
    assert {s.variant for s in speech.held_out_speakers()} <= set(speech.HELD_OUT_VARIANTS)
    # Word frequencies differ: mean total-variation distance between households' label mixes.
    p = np.array([h.word_probs for h in hs])
    tv = 0.5 * np.abs(p[:, None, :] - p[None, :, :]).sum(axis=2)
    assert tv[np.triu_indices(len(hs), 1)].mean() > 0.4
    assert len({h.room.noise for h in hs}) == len(speech.NOISES)
    assert len({len(h.speakers) for h in hs}) == 3


def test_held_out_set_is_balanced(speech_cache: str) -> None:
    from models import speech

    test = speech.held_out_set()
    assert len(test) == speech.TEST_SPEAKERS * len(speech.KEYWORDS) * speech.TEST_TAKES
    assert np.all(np.bincount(test.y) == speech.TEST_SPEAKERS * speech.TEST_TAKES)


def test_utterance_recreates_the_cached_features(speech_cache: str) -> None:
    from models import speech

    clip, word = speech.utterance(5, 2)
    cached = speech.household_features(5)
    assert speech.KEYWORDS[int(cached.y[2])] == word
    assert np.allclose(audio.features(clip), cached.x[2], atol=1e-6)


def test_missing_espeak_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from models import speech

    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    with pytest.raises(speech.SpeechUnavailable, match="apt-get install espeak-ng"):
        speech.households(2)


# --- hospitals -------------------------------------------------------------------------------


def test_breast_cancer_hospitals_are_skewed_and_deterministic() -> None:
    shards, test = medical.breast_cancer_hospitals()
    again, _ = medical.breast_cancer_hospitals()
    assert all(np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y) for a, b in zip(shards, again, strict=True))
    sizes = [len(s) for s in shards]
    assert sum(sizes) + len(test) == 569 and max(sizes) / min(sizes) > 5
    malignant = [float(np.mean(s.y == 0)) for s in shards]
    assert max(malignant) - min(malignant) > 0.4
    # Published-range min-max scaling: the test set (no site gain) stays in [0, 1].
    assert test.x.min() >= 0 and test.x.max() <= 1
    lo, hi = medical.breast_cancer_ranges()
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer().data
    assert np.allclose(lo, raw.min(axis=0)) and np.allclose(hi, raw.max(axis=0))
    # Feature skew: the referral centre's digitisation reads sizes 6 % larger.
    referral = medical.HOSPITALS[1]
    assert referral.gain != 1.0


def test_cell_images_are_deterministic_in_range_and_shifted_per_hospital() -> None:
    a = medical.cell_images(50, 0, medical.HOSPITALS[4])
    b = medical.cell_images(50, 0, medical.HOSPITALS[4])
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert a.x.shape == (50, 784) and a.x.min() >= 0 and a.x.max() <= 1
    shards, test = medical.cell_hospitals(total=600, test_size=200)
    assert [len(s) for s in shards] == [240, 150, 102, 72, 36]
    assert set(np.unique(test.y)) == {0, 1, 2, 3}
    normal_share = [float(np.mean(s.y == 0)) for s in shards]
    assert max(normal_share) - min(normal_share) > 0.3
    # Scanner shift: the same class looks different at two sites (mean brightness of class 0).
    bright = [float(s.x[s.y == 0].mean()) for s in shards]
    assert max(bright) - min(bright) > 0.01


# --- normalisation and the range check --------------------------------------------------------


def test_range_mismatch_catches_raw_and_double_scaled_digits() -> None:
    train, _ = digits()
    assert range_mismatch(train.x, (0.0, 1.0)) is None
    raw = range_mismatch(train.x * 16, (0.0, 1.0))
    assert raw is not None and "[0, 16]" in raw and "[0, 1]" in raw
    twice = range_mismatch(train.x / 16, (0.0, 1.0))
    assert twice is not None and "scaled twice" in twice


def test_model_spec_carries_labels_and_input_range() -> None:
    spec = ModelSpec("mlp", 196, 10, 128, labels=("yes", "no"), input_range=(0.0, 1.0))
    assert ModelSpec.from_wire(spec.to_wire()) == spec
    assert ModelSpec.from_wire(ModelSpec("softmax", 64, 10).to_wire()).input_range is None
    for bad in (
        {"labels": ["x"] * 11},
        {"labels": [""]},
        {"labels": "yes,no"},
        {"input_range": [1.0, 0.0]},
        {"input_range": [0.0, float("nan")]},
        {"input_range": [0.0]},
    ):
        with pytest.raises(DecodeError):
            ModelSpec.from_wire({**spec.to_wire(), **bad})


def test_config_validates_labels_and_input_range() -> None:
    AggregatorConfig(num_classes=2, labels="malignant, benign", input_min=0, input_max=1).validate()
    assert AggregatorConfig(labels="a, b").label_names == ("a", "b")
    with pytest.raises(ConfigError, match=r"aggregator\.labels"):
        AggregatorConfig(num_classes=2, labels="a,b,c").validate()
    with pytest.raises(ConfigError, match=r"aggregator\.input_min"):
        AggregatorConfig(input_min=0.0).validate()
    with pytest.raises(ConfigError, match=r"aggregator\.input_min"):
        AggregatorConfig(input_min=1.0, input_max=0.0).validate()


# --- docs/protocol.md "Models" is enough to run a model without torch ---------------------


def _conv3x3(x: np.ndarray, w: np.ndarray, b: np.ndarray, pad: int) -> np.ndarray:
    """Cross-correlation as the doc says: weights (out, in, 3, 3), stride 1."""
    x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    _, _, h, wd = x.shape
    patches = np.stack([x[:, :, i : i + h - 2, j : j + wd - 2] for i in range(3) for j in range(3)], axis=-1)
    return np.einsum("ncxyk,ock->noxy", patches, w.reshape(w.shape[0], w.shape[1], 9)) + b[None, :, None, None]


def _pool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    x = x[:, :, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def _doc_forward(name: str, t: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    relu = lambda z: np.maximum(z, 0)  # noqa: E731
    dense = lambda z, k: z @ t[f"{k}.weight"].T + t[f"{k}.bias"]  # noqa: E731
    if name == "speech-cnn":
        h = _pool2(relu(_conv3x3(x.reshape(-1, 1, 14, 14), t["0.weight"], t["0.bias"], 1)))
        logits = dense(relu(dense(h.reshape(len(x), -1), 4)), 6)
    else:  # med-cnn
        h = _pool2(relu(_conv3x3(x.reshape(-1, 1, 28, 28), t["0.weight"], t["0.bias"], 0)))
        h = _pool2(relu(_conv3x3(h, t["3.weight"], t["3.bias"], 0)))
        logits = dense(relu(dense(h.reshape(len(x), -1), 7)), 9)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("name", "features", "classes"), [("speech-cnn", 196, 10), ("med-cnn", 784, 4)])
def test_the_documented_forward_pass_reproduces_the_torch_models(name: str, features: int, classes: int) -> None:
    pytest.importorskip("torch")
    from models import create_model

    m = create_model(name, num_features=features, num_classes=classes, seed=3)
    x = np.random.default_rng(0).random((16, features)).astype(np.float32)
    got = _doc_forward(name, {k: v.astype(np.float64) for k, v in m.get_weights().items()}, x.astype(np.float64))
    assert np.allclose(got, m.predict_proba(x), atol=1e-5)


def test_an_epsilon_budget_without_dp_is_refused_naming_the_key() -> None:
    from fedmq.config import PrivacyConfig

    with pytest.raises(ConfigError, match=r"privacy\.epsilon_budget.*privacy is off"):
        PrivacyConfig(enabled=False, epsilon_budget=8).validate()
