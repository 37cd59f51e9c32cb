"""A deterministic synthetic talking-head corpus in the MMSA raw layout.

    python -m tools.demo                      (the committed demo: --out raw/demo --clips 120 --seed 0)
    python -m tools.demo --out /tmp/bench --clips 2000 --size 480x360 --jobs 2

writes

    <out>/label.csv                      video_id,clip_id,text,label,mode   (what `prepare` reads)
    <out>/Raw/<video_id>/<clip_id>.mp4   H.264 video + AAC mono audio, 2-4 s each
    <out>/components.csv                 video_id,clip_id,s_text,s_face,s_voice,duration (the hidden truth)

Nothing is downloaded: faces are drawn with OpenCV, the voice is synthesised with
numpy/scipy and PyAV (bundled FFmpeg: libx264 + native aac) encodes both. From Python:

    generate_corpus(out, n_clips, seed, size=(320, 240), fps=15, jobs=1) -> label rows (DataFrame)
    plan_corpus(n_clips, seed) -> (speakers, clip plans): components, text, label; no media
    write_clip(path, s_face=.., s_voice=.., duration=.., with_audio=.., audio_gain=..): one clip

Speakers. `--speakers` (default 12) speakers spk01..spkNN, each with its own face
shape and size, skin, hair and shirt colours, room (wall, window, shelf), base pitch, formant
scale and speaking rate. video_id = speaker, clip_id = 1..k; clip i (0-based)
belongs to speaker i mod N. The split is speaker-independent: the last
round(N/6) speakers are test, the round(N/6) before them valid, the rest train
(12 speakers -> 8 train / 2 valid / 2 test).

The generative rule (one clip). Three independent sentiment components:

    s_text  = 0 with prob 0.25, else  sign * level/3,  sign = +-1, level uniform in {1, 2, 3}
    s_face  = 0 with prob 0.25, else  sign * U(0.2, 1.0)
    s_voice = 0 with prob 0.25, else  sign * U(0.2, 1.0)
    label   = round(clip(1.5 * (s_text + s_face + s_voice), -3, 3) / 0.2) * 0.2   (MOSI-like 0.2 grid)

The gain 1.5 gives MOSI's spread (label sd ~1.5, ~19% of |label| >= 2, ~4% clipped).
Each component moves the label by at most 1.5 of the 6 units, so no single
modality suffices (each alone explains ~30-39% of the label variance, any two
~70%), and text whose polarity opposes the label ("misleading" text) happens
whenever face + voice outweigh it. How each component is rendered:

  text   a templated sentence whose only polar phrase expresses s_text exactly:
           level 1: a mild word ("good" / "bad"), or "not" + any word of the other polarity
                    ("not bad" = +1/3, "not great" = -1/3)
           level 2: a strong word ("great" / "awful"), an intensifier + mild word
                    ("really good"), or an intensifier + negated word ("really not good" = -2/3)
           level 3: an intensifier + strong word ("really amazing", "absolutely terrible")
           (words and intensifiers: POSITIVE, NEGATIVE, *_INTENSIFIERS below)
           s_text = 0: a sentence with no polar word ("the film was based on a book").
  face   mouth: corners lift by 0.5 * s_face of the mouth half-width (smile vs frown),
           the mouth widens with s_face and opens into a toothy smile for s_face > 0;
           brows: arched for s_face > 0, lowered with the inner ends pulled down and
           frown lines between them for s_face < 0; cheeks blush and eyes narrow with
           a smile; the head droops for s_face < 0 and moves more the happier the
           face. The jaw also opens and closes with the voice's syllables (talking).
  voice  glottal pulses through three formant resonators, one vowel per syllable:
           pitch level  = speaker f0 * 2^(4 * s_voice / 12)     (+-4 semitones)
           pitch range  = accents of max(0.3, 3.5 + 3 * s_voice) semitones (flat when sad)
           tempo        = speaker rate * 2^(0.5 * s_voice)       (x0.71 .. x1.41 syllables/s)

Everything random comes from numpy Generators seeded with (seed, stream, index),
so a clip depends only on (--seed, --speakers, its index, --size, --fps), never
on --jobs or on the other clips;
x264 runs single-threaded with bit-exact muxing so the same arguments give
byte-identical files (on the same FFmpeg/x264 build).
"""
from __future__ import annotations

import argparse
import math
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import pandas as pd
from scipy.signal import sosfilt

# -----------------------------------------------------------------------------
# defaults (the committed demo is generated with these)
N_SPEAKERS = 12
N_CLIPS = 120               # the committed demo corpus (raw/demo)
SIZE = (320, 240)            # width x height; 480x360 is closer to CMU-MOSI
FPS = 15
SAMPLE_RATE = 16000          # mono; matches params.yaml features.acoustic.sample_rate
DURATION = (2.3, 3.7)        # seconds, uniform; inside [2, 4] with room for AAC padding
CRF = 26                     # x264 quality (lower = better, bigger); drawn faces compress well
X264_PRESET = "superfast"   # ~1.5x faster than veryfast, files ~2x bigger: still tiny
AUDIO_BITRATE = 32000
P_NEUTRAL = {"text": 0.25, "face": 0.25, "voice": 0.25}  # prob. a component is forced to 0
MAGNITUDE = (0.2, 1.0)       # |s_face|, |s_voice| when not neutral
LABEL_GAIN = 1.5             # label = clip(LABEL_GAIN * (s_text + s_face + s_voice), -3, 3) ...
LABEL_STEP = 0.2             # ... rounded to this grid
# how strongly the voice carries s_voice
PITCH_LEVEL_ST = 4.0         # semitones of mean pitch shift at |s_voice| = 1
PITCH_RANGE_ST = (3.5, 3.0)  # accent size = 3.5 + 3.0 * s_voice semitones
TEMPO_OCTAVES = 0.5          # syllable rate * 2 ** (0.5 * s_voice)
# random-stream tags, so speakers, clip plans and rendering never share draws
STREAM_SPEAKER, STREAM_PLAN, STREAM_RENDER = 0, 1, 2


def rng_for(seed: int, *keys: int) -> np.random.Generator:
    """An independent generator for (seed, stream tag, index, ...)."""
    return np.random.default_rng([seed, *keys])


# -----------------------------------------------------------------------------
# speakers


@dataclass(frozen=True)
class Speaker:
    video_id: str
    split: str
    skin: tuple          # BGR, as OpenCV draws
    hair: tuple
    shirt: tuple
    wall_lit: tuple      # the wall behind, where the light falls ...
    wall_shadow: tuple   # ... and in the far, dark corner
    lit_from_left: bool
    props: tuple         # ((x0, y0, x1, y1) frame fractions, BGR): window, picture, shelf beside the head
    long_hair: bool
    face_height: float   # face ellipse height / frame height
    face_aspect: float   # face width / face height
    face_dx: float       # horizontal offset of the face, fraction of frame width
    f0: float            # Hz, neutral speaking pitch
    formant_scale: float # 1.0 adult male tract, ~1.15 female
    syllable_rate: float # syllables per second at s_voice = 0


def speaker_splits(n_speakers: int) -> list[str]:
    """train/valid/test per speaker index: the last round(N/6) test, the round(N/6) before valid."""
    if n_speakers < 3:
        raise ValueError(f"need at least 3 speakers for a train/valid/test split, got {n_speakers}")
    n_held = max(1, round(n_speakers / 6))
    return ["train"] * (n_speakers - 2 * n_held) + ["valid"] * n_held + ["test"] * n_held


def _bgr_from_hsv(h: float, s: float, v: float) -> tuple:
    hsv = np.array([[[h * 180, s * 255, v * 255]]], np.uint8)
    return tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])


def _grey(bgr: tuple) -> float:
    return 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]


def _room_props(rng: np.random.Generator) -> tuple:
    """A bright window or lamp-lit picture on one side of the head, a dark shelf on the other."""
    bright_left = rng.random() < 0.5
    x_bright, x_dark = (0.02, 0.72) if bright_left else (0.72, 0.02)
    window = ((x_bright + rng.uniform(0, 0.04), rng.uniform(0.05, 0.15), x_bright + rng.uniform(0.2, 0.26),
               rng.uniform(0.45, 0.6)), _bgr_from_hsv(rng.uniform(0, 1), rng.uniform(0, 0.15), rng.uniform(0.85, 1)))
    shelf = ((x_dark + rng.uniform(0, 0.04), rng.uniform(0.55, 0.7), x_dark + rng.uniform(0.2, 0.26), 1.0),
             _bgr_from_hsv(rng.uniform(0, 1), rng.uniform(0.2, 0.6), rng.uniform(0.1, 0.3)))
    return window, shelf


def make_speakers(seed: int, n_speakers: int = N_SPEAKERS) -> list[Speaker]:
    speakers = []
    for i, split in enumerate(speaker_splits(n_speakers)):
        rng = rng_for(seed, STREAM_SPEAKER, i)
        high_voice = i % 2 == 1  # alternate low and high voices so every split has both
        tone = rng.uniform(0.0, 1.0)  # 0 light .. 1 dark skin
        skin = np.array([165, 195, 238]) * (1 - tone) + np.array([70, 98, 145]) * tone
        skin = tuple(int(c) for c in skin + rng.uniform(-8, 8, 3))
        hair = [(25, 25, 30), (30, 45, 75), (45, 45, 50), (25, 60, 120), (60, 90, 140)][rng.integers(5)]
        if _grey(hair) > 0.45 * _grey(skin):  # hair and brows must stand out from the skin
            hair = (25, 25, 30)
        hue = rng.uniform(0, 1)
        wall_sat = rng.uniform(0.05, 0.35)
        speakers.append(Speaker(
            video_id=f"spk{i + 1:02d}", split=split, skin=skin, hair=hair,
            shirt=_bgr_from_hsv(rng.uniform(0, 1), rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7)),
            wall_lit=_bgr_from_hsv(hue, wall_sat, rng.uniform(0.7, 0.95)),
            wall_shadow=_bgr_from_hsv(hue, wall_sat, rng.uniform(0.15, 0.35)),
            lit_from_left=bool(rng.random() < 0.5), props=_room_props(rng),
            long_hair=bool(high_voice and rng.random() < 0.7),
            face_height=float(rng.uniform(0.44, 0.56)), face_aspect=float(rng.uniform(0.70, 0.80)),
            face_dx=float(rng.uniform(-0.06, 0.06)),
            f0=float(rng.uniform(185, 225) if high_voice else rng.uniform(100, 130)),
            formant_scale=float(rng.uniform(1.12, 1.2) if high_voice else rng.uniform(0.95, 1.03)),
            syllable_rate=float(rng.uniform(3.6, 4.4)),
        ))
    return speakers


# -----------------------------------------------------------------------------
# transcripts: a tiny grammar whose one polar phrase carries s_text

POSITIVE = {1: ["good", "nice", "fun", "enjoyable", "decent"],
            2: ["great", "wonderful", "excellent", "brilliant", "amazing"]}
NEGATIVE = {1: ["bad", "boring", "dull", "weak", "disappointing"],
            2: ["terrible", "awful", "horrible", "painful", "dreadful"]}
MILD_INTENSIFIERS = ["really", "very", "so", "super"]              # + mild word  -> level 2
STRONG_INTENSIFIERS = ["really", "absolutely", "just", "truly"]   # + strong word -> level 3
NEGATION_INTENSIFIERS = ["really", "just", "definitely"]          # + "not" + word -> level 2
SUBJECTS = ["the movie", "the film", "the acting", "the story", "the ending", "the soundtrack",
            "the plot", "the main character", "the dialogue", "the second half"]
POLAR_FRAMES = ["{subj} was {phrase}", "i thought {subj} was {phrase}", "honestly {subj} was {phrase}",
                "i have to say {subj} was {phrase}", "um {subj} is {phrase}", "to me {subj} felt {phrase}",
                "so yeah {subj} was {phrase}", "i think {subj} is {phrase} overall"]
NEUTRAL_SENTENCES = ["i watched the movie last weekend with my brother", "the film is about two hours long",
                     "the story is based on a book i think", "it is set in a small town in the winter",
                     "um i saw it in the theater on a tuesday", "the movie came out last year",
                     "the main character is a teacher who moves to the city",
                     "it was shot in black and white", "the plot follows two families over ten years",
                     "so the film starts with a wedding"]


def polar_phrase(sign: int, level: int, rng: np.random.Generator) -> str:
    """A phrase worth sign * level / 3 under the rules in the module docstring."""
    same, other = (POSITIVE, NEGATIVE) if sign > 0 else (NEGATIVE, POSITIVE)
    pick = lambda words: words[rng.integers(len(words))]  # noqa: E731
    any_other = other[1] + other[2]
    if level == 1:
        options = [lambda: pick(same[1]), lambda: "not " + pick(any_other)]
    elif level == 2:
        options = [lambda: pick(same[2]), lambda: pick(MILD_INTENSIFIERS) + " " + pick(same[1]),
                   lambda: pick(NEGATION_INTENSIFIERS) + " not " + pick(any_other)]
    else:
        options = [lambda: pick(STRONG_INTENSIFIERS) + " " + pick(same[2])]
    return options[rng.integers(len(options))]()


def make_transcript(s_text: float, rng: np.random.Generator) -> str:
    if s_text == 0:
        return NEUTRAL_SENTENCES[rng.integers(len(NEUTRAL_SENTENCES))]
    sign, level = (1 if s_text > 0 else -1), int(round(abs(s_text) * 3))
    frame = POLAR_FRAMES[rng.integers(len(POLAR_FRAMES))]
    return frame.format(subj=SUBJECTS[rng.integers(len(SUBJECTS))], phrase=polar_phrase(sign, level, rng))


# -----------------------------------------------------------------------------
# the corpus plan: components, transcript and label of every clip (no media)


@dataclass(frozen=True)
class ClipPlan:
    index: int
    video_id: str
    clip_id: str
    mode: str
    duration: float
    s_text: float
    s_face: float
    s_voice: float
    text: str
    label: float


def sentiment_label(s_text: float, s_face: float, s_voice: float) -> float:
    value = float(np.clip(LABEL_GAIN * (s_text + s_face + s_voice), -3, 3))
    return round(round(value / LABEL_STEP) * LABEL_STEP, 1) + 0.0  # + 0.0 turns -0.0 into 0.0


def plan_clip(index: int, seed: int, speakers: list[Speaker]) -> ClipPlan:
    rng = rng_for(seed, STREAM_PLAN, index)
    speaker = speakers[index % len(speakers)]
    sign = lambda: 1 if rng.random() < 0.5 else -1  # noqa: E731
    s_text = 0.0 if rng.random() < P_NEUTRAL["text"] else sign() * int(rng.integers(1, 4)) / 3
    s_face = 0.0 if rng.random() < P_NEUTRAL["face"] else sign() * float(rng.uniform(*MAGNITUDE))
    s_voice = 0.0 if rng.random() < P_NEUTRAL["voice"] else sign() * float(rng.uniform(*MAGNITUDE))
    # 4 decimals, so components.csv holds exactly the values the label was computed from
    s_text, s_face, s_voice = round(s_text, 4) + 0.0, round(s_face, 4) + 0.0, round(s_voice, 4) + 0.0
    return ClipPlan(
        index=index, video_id=speaker.video_id, clip_id=str(index // len(speakers) + 1), mode=speaker.split,
        duration=round(float(rng.uniform(*DURATION)), 3), s_text=s_text, s_face=s_face, s_voice=s_voice,
        text=make_transcript(s_text, rng), label=sentiment_label(s_text, s_face, s_voice))


def plan_corpus(n_clips: int, seed: int, n_speakers: int = N_SPEAKERS) -> tuple[list[Speaker], list[ClipPlan]]:
    speakers = make_speakers(seed, n_speakers)
    return speakers, [plan_clip(i, seed, speakers) for i in range(n_clips)]


# -----------------------------------------------------------------------------
# voice: glottal pulses -> per-syllable formant filters, prosody from s_voice

# (F1, F2, F3) in Hz for an adult male tract, and how wide the mouth opens for each vowel
VOWELS = {"a": ((730, 1090, 2440), 1.0), "e": ((530, 1840, 2480), 0.7), "i": ((270, 2290, 3010), 0.4),
          "o": ((570, 840, 2410), 0.8), "u": ((300, 870, 2240), 0.5)}
FORMANT_BANDWIDTHS = (90, 110, 170)


@dataclass
class Syllables:
    onset: np.ndarray    # seconds
    length: np.ndarray   # seconds
    vowel: list          # keys of VOWELS
    accent: np.ndarray   # pitch accent, in units of the pitch range (0 = unstressed)


def plan_syllables(duration: float, s_voice: float, speaker: Speaker, rng: np.random.Generator) -> Syllables:
    rate = speaker.syllable_rate * 2 ** (TEMPO_OCTAVES * s_voice)
    onsets, lengths, vowels, accents = [], [], [], []
    t, end = rng.uniform(0.1, 0.25), duration - 0.15
    while True:
        period = rng.uniform(0.8, 1.2) / rate
        length = period * rng.uniform(0.6, 0.8)
        if t + length > end:
            break
        onsets.append(t)
        lengths.append(length)
        vowels.append("aeiou"[rng.integers(5)])
        accents.append(rng.uniform(0.5, 1.0) if rng.random() < 0.45 else rng.uniform(-0.15, 0.15))
        t += period + (rng.uniform(0.12, 0.25) if rng.random() < 0.12 else 0.0)  # sometimes a word pause
    return Syllables(np.array(onsets), np.array(lengths), vowels, np.array(accents))


def syllable_bump(times: np.ndarray, onset: float, length: float, ramp: float = 0.03) -> np.ndarray:
    """0..1 at `times`: one syllable, a plateau with raised-cosine ramps `ramp` seconds long."""
    inside = np.clip(np.minimum(times - onset, onset + length - times) / ramp, 0, 1)
    return 0.5 - 0.5 * np.cos(np.pi * inside)


def pitch_contour(syl: Syllables, duration: float, s_voice: float, speaker: Speaker,
                  times: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """f0 in Hz at `times`: level and accent range from s_voice, a falling declination line."""
    level = speaker.f0 * 2 ** (PITCH_LEVEL_ST * s_voice / 12)
    accent_st = max(0.3, PITCH_RANGE_ST[0] + PITCH_RANGE_ST[1] * s_voice)
    knots_t, knots_st = [0.0], [0.0]
    for onset, length, accent in zip(syl.onset, syl.length, syl.accent):
        knots_t += [onset, onset + 0.5 * length, onset + length]
        knots_st += [0.0, accent * accent_st, 0.2 * accent * accent_st]
    knots_t.append(duration + 1.0)
    knots_st.append(0.0)
    semitones = np.interp(times, knots_t, knots_st)
    semitones += -2.0 * times / duration                                   # declination
    semitones += 0.15 * np.sin(2 * np.pi * 5.5 * times + rng.uniform(0, 6.3))  # slight vibrato
    return level * 2 ** (semitones / 12)


def _resonators(formants: tuple, sample_rate: int) -> np.ndarray:
    """Second-order sections of a cascade of formant resonators (unit gain at DC)."""
    sos = []
    for f, bw in zip(formants, FORMANT_BANDWIDTHS):
        r = math.exp(-math.pi * bw / sample_rate)
        c = 2 * r * math.cos(2 * math.pi * min(f, 0.45 * sample_rate) / sample_rate)
        sos.append([1 - c + r * r, 0, 0, 1, -c, r * r])
    return np.array(sos)


def synth_voice(duration: float, s_voice: float, speaker: Speaker, syl: Syllables,
                rng: np.random.Generator, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 in [-1, 1], `duration` seconds long."""
    n = int(round(duration * sample_rate))
    times = np.arange(n) / sample_rate
    f0 = pitch_contour(syl, duration, s_voice, speaker, times, rng)
    phase = np.cumsum(f0 / sample_rate)
    # Rosenberg glottal flow (opens over 40% of the cycle, closes over 16%), differentiated:
    # the sharp closure gives the rich harmonic spectrum of a real voice.
    frac = phase % 1.0
    flow = np.where(frac < 0.4, 0.5 - 0.5 * np.cos(np.pi * frac / 0.4),
                    np.where(frac < 0.56, np.cos(0.5 * np.pi * (frac - 0.4) / 0.16), 0.0))
    source = np.diff(flow, prepend=0.0) * (sample_rate / f0)  # pitch-independent pulse strength
    source += 0.08 * rng.standard_normal(n) * flow               # breathiness during the open phase
    voice = np.zeros(n + sample_rate // 10)
    for onset, length, vowel in zip(syl.onset, syl.length, syl.vowel):
        start, stop = int(onset * sample_rate), int((onset + length) * sample_rate)
        env = syllable_bump(times[start:stop], onset, length)
        segment = np.concatenate([source[start:stop] * env, np.zeros(sample_rate // 20)])  # room to ring out
        formants = tuple(f * speaker.formant_scale for f in VOWELS[vowel][0])
        voice[start:start + len(segment)] += sosfilt(_resonators(formants, sample_rate), segment)
        if rng.random() < 0.6:  # a consonant: a short burst of high-passed noise before the vowel
            burst = int(rng.uniform(0.02, 0.05) * sample_rate)
            noise = np.diff(rng.standard_normal(burst + 1)) * np.linspace(1, 0, burst) * 0.15
            b0 = max(0, start - burst // 2)
            voice[b0:b0 + burst] += noise[:len(voice[b0:b0 + burst])]
    voice = voice[:n]
    voice *= 0.1 / max(1e-9, np.sqrt(np.mean(voice ** 2)))  # -20 dBFS RMS
    voice += 0.002 * rng.standard_normal(n)                   # room noise
    return np.clip(voice, -0.95, 0.95).astype(np.float32)


# -----------------------------------------------------------------------------
# face: a shaded head drawn once per clip, eyes and mouth redrawn per frame

SUBPIXEL_BITS = 4  # OpenCV draws with coordinates in 1/16 pixel
_S = 1 << SUBPIXEL_BITS


def _pt(x, y):
    return (int(round(x * _S)), int(round(y * _S)))


def _axes(a, b):
    return (max(1, int(round(a * _S))), max(1, int(round(b * _S))))


def _scaled(color, k):
    return tuple(int(min(255, c * k)) for c in color)


@dataclass
class FaceGeometry:
    cx: float
    cy: float
    a: float   # half-width of the face ellipse, pixels
    b: float   # half-height


def face_geometry(speaker: Speaker, width: int, height: int) -> FaceGeometry:
    b = speaker.face_height * height / 2
    return FaceGeometry(cx=width / 2 + speaker.face_dx * width, cy=0.49 * height, a=b * speaker.face_aspect, b=b)


def draw_room(speaker: Speaker, width: int, height: int) -> np.ndarray:
    """The wall, lit from one side, with a window and a shelf. Its brightness spans a wide range
    like a real room's: on a flat backdrop, histogram equalisation (which face detectors often
    apply first) squeezes the whole face into a few grey levels and the Haar cascade misses it."""
    x = np.linspace(0, 1, width, dtype=np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)
    dark = 0.65 * (1 - x if speaker.lit_from_left else x)[None, :] + 0.35 * y[:, None]
    img = (np.array(speaker.wall_lit, np.float32) * (1 - dark[..., None])
           + np.array(speaker.wall_shadow, np.float32) * dark[..., None]).astype(np.uint8)
    for (x0, y0, x1, y1), color in speaker.props:
        p0, p1 = (int(x0 * width), int(y0 * height)), (int(x1 * width), int(y1 * height))
        cv2.rectangle(img, p0, p1, color, -1)
        cv2.rectangle(img, p0, p1, _scaled(color, 0.5), max(2, width // 100))  # frame
    return img


def draw_head(speaker: Speaker, s_face: float, width: int, height: int) -> np.ndarray:
    """Background, shoulders, hair, shaded face, nose, brows, cheeks: the parts that do not move
    relative to the head during a clip."""
    g = face_geometry(speaker, width, height)
    cx, cy, a, b = g.cx, g.cy, g.a, g.b
    happy, sad = max(s_face, 0.0), max(-s_face, 0.0)
    img = draw_room(speaker, width, height)
    aa = cv2.LINE_AA
    # shoulders and neck
    cv2.ellipse(img, _pt(cx, cy + 1.8 * b), _axes(2.1 * a, 0.8 * b), 0, 0, 360, speaker.shirt, -1, aa, SUBPIXEL_BITS)
    neck = _scaled(speaker.skin, 0.72)
    cv2.rectangle(img, _pt(cx - 0.45 * a, cy + 0.5 * b), _pt(cx + 0.45 * a, cy + 1.15 * b), neck, -1, aa, SUBPIXEL_BITS)
    cv2.ellipse(img, _pt(cx, cy + 1.12 * b), _axes(0.45 * a, 0.12 * b), 0, 0, 180, neck, -1, aa, SUBPIXEL_BITS)
    # hair behind the head (down to the shoulders for long hair)
    cv2.ellipse(img, _pt(cx, cy - 0.1 * b), _axes(1.15 * a, 1.04 * b), 0, 180, 360, speaker.hair, -1, aa, SUBPIXEL_BITS)
    cv2.rectangle(img, _pt(cx - 1.15 * a, cy - 0.1 * b), _pt(cx + 1.15 * a, cy + 0.25 * b), speaker.hair, -1, aa,
                  SUBPIXEL_BITS)
    if speaker.long_hair:
        cv2.ellipse(img, _pt(cx, cy + 0.25 * b), _axes(1.15 * a, 0.75 * b), 0, 0, 180, speaker.hair, -1, aa,
                    SUBPIXEL_BITS)
    for side in (-1, 1):  # ears
        cv2.ellipse(img, _pt(cx + side * 0.97 * a, cy - 0.02 * b), _axes(0.16 * a, 0.22 * b), 0, 0, 360,
                    _scaled(speaker.skin, 0.85), -1, aa, SUBPIXEL_BITS)

    # the face: an ellipsoid lit from the upper left, darker eye sockets, nose shadow, blush
    x0, x1, y0, y1 = int(cx - a) - 2, int(cx + a) + 3, int(cy - b) - 2, int(cy + b) + 3
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    X, Y = np.meshgrid((np.arange(x0, x1, dtype=np.float32) - cx) / a, (np.arange(y0, y1, dtype=np.float32) - cy) / b)
    nz = np.sqrt(np.clip(1 - X ** 2 - Y ** 2, 0, 1))
    light = np.clip(-0.36 * X - 0.46 * Y + 0.81 * nz, 0, 1)
    shade = 0.45 + 0.6 * light
    blob = lambda x, y, sx, sy: np.exp(-(((X - x) / sx) ** 2 + ((Y - y) / sy) ** 2))  # noqa: E731
    shadow = blob(-0.38, -0.12, 0.26, 0.13) + blob(0.38, -0.12, 0.26, 0.13)   # eye sockets
    shadow += 0.6 * blob(0.1, 0.05, 0.06, 0.25) + 0.5 * blob(0.0, 0.32, 0.18, 0.05)  # nose side, under the nose
    shade *= 1 - 0.28 * np.clip(shadow, 0, 1.2)
    face = np.array(speaker.skin, np.float32) * shade[..., None]
    blush = (0.45 * happy) * (blob(-0.5, 0.22, 0.2, 0.13) + blob(0.5, 0.22, 0.2, 0.13))
    face = face * (1 - blush[..., None]) + np.array([140, 140, 245], np.float32) * blush[..., None]
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.ellipse(mask, _pt(cx - x0, cy - y0), _axes(a, b), 0, 0, 360, 255, -1, aa, SUBPIXEL_BITS)
    alpha = (mask.astype(np.float32) / 255)[..., None]
    region = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.clip(region * (1 - alpha) + face * alpha, 0, 255).astype(np.uint8)

    # fringe over the top of the forehead
    cv2.ellipse(img, _pt(cx, cy - 0.62 * b), _axes(1.02 * a, 0.44 * b), 0, 180, 360, speaker.hair, -1, aa,
                SUBPIXEL_BITS)
    # nose: nostrils and a light bridge
    for side in (-1, 1):
        cv2.ellipse(img, _pt(cx + side * 0.09 * a, cy + 0.27 * b), _axes(0.05 * a, 0.025 * b), 0, 0, 360,
                    _scaled(speaker.skin, 0.35), -1, aa, SUBPIXEL_BITS)
    cv2.line(img, _pt(cx - 0.02 * a, cy - 0.05 * b), _pt(cx - 0.03 * a, cy + 0.18 * b),
             _scaled(speaker.skin, 1.12), max(1, int(0.03 * b)), aa, SUBPIXEL_BITS)

    # brows: arched when happy (raising them whole costs Haar detections); lowered, inner ends
    # down and in when sad
    brow = _scaled(speaker.hair, 0.6)
    eye_y = cy - 0.12 * b
    u = np.linspace(0, 1, 9)[:, None]
    for side in (-1, 1):
        inner = np.array([cx + side * (0.14 - 0.04 * sad) * a, eye_y - 0.2 * b + 0.12 * sad * b])
        middle = np.array([cx + side * 0.36 * a, eye_y - 0.3 * b + 0.06 * sad * b - 0.04 * happy * b])
        outer = np.array([cx + side * 0.6 * a, eye_y - 0.2 * b - 0.03 * sad * b])
        curve = (1 - u) ** 2 * inner + 2 * u * (1 - u) * middle + u ** 2 * outer  # quadratic Bezier
        cv2.polylines(img, [np.round(curve * _S).astype(np.int32)], False, brow, max(2, int(0.055 * b)), aa,
                      SUBPIXEL_BITS)
    if sad > 0:  # vertical frown lines between the brows
        line = _scaled(speaker.skin, 1 - 0.45 * sad)
        for side in (-1, 1):
            cv2.line(img, _pt(cx + side * 0.05 * a, eye_y - 0.2 * b), _pt(cx + side * 0.04 * a, eye_y - 0.08 * b),
                     line, max(1, int(0.02 * b)), aa, SUBPIXEL_BITS)
    return img


def draw_eyes(img: np.ndarray, speaker: Speaker, s_face: float, openness: float) -> None:
    g = face_geometry(speaker, img.shape[1], img.shape[0])
    cx, cy, a, b = g.cx, g.cy, g.a, g.b
    eye_y = cy - 0.12 * b
    openness *= 1 - 0.25 * abs(s_face)  # a smile narrows the eyes; sadness lowers the lids
    aa = cv2.LINE_AA
    for side in (-1, 1):
        ex = cx + side * 0.38 * a
        if openness > 0.25:
            cv2.ellipse(img, _pt(ex, eye_y), _axes(0.19 * a, 0.085 * b * openness), 0, 0, 360, (232, 238, 242), -1,
                        aa, SUBPIXEL_BITS)
            cv2.circle(img, _pt(ex, eye_y), int(0.07 * b * _S), (40, 50, 70), -1, aa, SUBPIXEL_BITS)
            cv2.circle(img, _pt(ex, eye_y), int(0.033 * b * _S), (10, 10, 10), -1, aa, SUBPIXEL_BITS)
            # re-cover the iris outside the lids with skin, so a narrowed eye looks narrowed
            for lid in (-1, 1):
                cv2.ellipse(img, _pt(ex, eye_y + lid * (0.085 * b * openness + 0.05 * b)), _axes(0.21 * a, 0.05 * b),
                            0, 0, 360, _scaled(speaker.skin, 0.8), -1, aa, SUBPIXEL_BITS)
        cv2.ellipse(img, _pt(ex, eye_y), _axes(0.2 * a, max(0.01 * b, 0.09 * b * openness)), 0, 180, 360,
                    (30, 30, 40), max(1, int(0.022 * b)), aa, SUBPIXEL_BITS)  # upper lid and lashes


def draw_mouth(img: np.ndarray, speaker: Speaker, s_face: float, talk: float) -> None:
    """Corners lift with s_face (smile) or drop (frown); `talk` in 0..1 opens the jaw."""
    g = face_geometry(speaker, img.shape[1], img.shape[0])
    cx, a, b = g.cx, g.a, g.b
    my = g.cy + 0.52 * b
    half = 0.40 * a * (1 + 0.15 * s_face)             # a smile widens the mouth
    lift = -0.5 * half * s_face                        # corner height relative to the centre (up < 0)
    opening = 0.3 * half * talk + 0.45 * half * max(s_face, 0.0)
    u = np.linspace(-1, 1, 17)
    mid = my + lift * (u ** 2 - 0.5)                   # keep the mouth centred as it bends
    upper = np.stack([cx + u * half, mid - 0.3 * opening * (1 - u ** 2)], 1)
    lower = np.stack([cx + u * half, mid + 0.7 * opening * (1 - u ** 2)], 1)
    lip = tuple(int(0.4 * s + 0.6 * r) for s, r in zip(speaker.skin, (60, 50, 165)))
    thickness = max(2, int(0.05 * b))
    poly = lambda pts: np.round(pts * _S).astype(np.int32)  # noqa: E731
    aa = cv2.LINE_AA
    if opening > 0.5:
        cv2.fillPoly(img, [poly(np.concatenate([upper, lower[::-1]]))], (40, 30, 80), aa, SUBPIXEL_BITS)
        if s_face > 0:  # upper teeth in a smile
            teeth_low = np.stack([upper[:, 0], upper[:, 1] + 0.55 * opening * (1 - u ** 2)], 1)
            cv2.fillPoly(img, [poly(np.concatenate([upper, teeth_low[::-1]]))], (225, 232, 238), aa, SUBPIXEL_BITS)
    cv2.polylines(img, [poly(upper)], False, lip, thickness, aa, SUBPIXEL_BITS)
    cv2.polylines(img, [poly(lower)], False, lip, int(thickness * 1.3), aa, SUBPIXEL_BITS)
    if opening <= 0.5:  # the dark line where closed lips meet
        cv2.polylines(img, [poly(upper)], False, (35, 30, 60), 1, aa, SUBPIXEL_BITS)


def render_frames(speaker: Speaker, s_face: float, syl: Syllables, duration: float, size: tuple, fps: float,
                  rng: np.random.Generator):
    """Yield BGR uint8 frames: the clip's face talking along the syllables, blinking, moving a little."""
    width, height = size
    head = draw_head(speaker, s_face, width, height)
    n_frames = max(1, int(round(duration * fps)))
    times = np.arange(n_frames) / fps
    talk = np.zeros(n_frames)
    for onset, length, vowel in zip(syl.onset, syl.length, syl.vowel):  # the jaw opens by the vowel's openness
        talk = np.maximum(talk, VOWELS[vowel][1] * syllable_bump(times, onset, length, ramp=0.06))
    blinks = np.cumsum(rng.uniform(1.5, 4.0, 4)) - rng.uniform(0, 1.5)  # blink start times
    # head motion: livelier when happy, drooping when sad. Whole-pixel shifts of the frame: a
    # sub-pixel warp (cv2.warpAffine) would cost more than drawing and encoding the frame together.
    amp = 0.012 * height * (1 + 0.6 * s_face)
    phase = rng.uniform(0, 2 * np.pi, 2)
    droop = 0.04 * height * max(-s_face, 0.0) - 0.01 * height * max(s_face, 0.0)
    dxs = np.rint(amp * np.sin(2 * np.pi * 0.31 * times + phase[0])).astype(int)
    dys = np.rint(droop + 0.6 * amp * np.sin(2 * np.pi * 0.53 * times + phase[1])).astype(int)
    pad = int(max(np.abs(dxs).max(), np.abs(dys).max())) + 1
    for i, t in enumerate(times):
        frame = head.copy()
        blink = np.min(np.abs(t - blinks - 0.07)) < 0.07
        draw_eyes(frame, speaker, s_face, 0.1 if blink else 1.0)
        draw_mouth(frame, speaker, s_face, talk[i])
        framed = cv2.copyMakeBorder(frame, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
        y0, x0 = pad - dys[i], pad - dxs[i]
        yield np.ascontiguousarray(framed[y0:y0 + height, x0:x0 + width])


# -----------------------------------------------------------------------------
# encoding: PyAV (bundled FFmpeg), deterministic settings


def encode_mp4(path: str | os.PathLike, frames, fps: float, audio: np.ndarray | None = None,
               sample_rate: int = SAMPLE_RATE, crf: int = CRF, audio_bitrate: int = AUDIO_BITRATE) -> None:
    """Write BGR frames (+ optional mono float audio) as H.264/AAC mp4, atomically.
    Single-threaded x264 and bit-exact muxing make the bytes reproducible."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _encode(tmp, frames, fps, audio, sample_rate, crf, audio_bitrate)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _encode(tmp: Path, frames, fps, audio, sample_rate, crf, audio_bitrate) -> None:
    with av.open(str(tmp), "w", format="mp4", container_options={"fflags": "+bitexact"}) as container:
        video = None
        for frame_index, bgr in enumerate(frames):
            if video is None:  # size comes from the first frame
                video = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
                video.width, video.height, video.pix_fmt = bgr.shape[1], bgr.shape[0], "yuv420p"
                video.thread_count = 1
                video.codec_context.flags |= av.codec.context.Flags.bitexact
                video.options = {"crf": str(crf), "preset": X264_PRESET, "threads": "1"}
                if audio is not None:
                    sound = container.add_stream("aac", rate=sample_rate, layout="mono")
                    sound.bit_rate = audio_bitrate
                    sound.options = {"aac_coder": "fast"}  # ~8x faster than the default twoloop coder
                    sound.codec_context.flags |= av.codec.context.Flags.bitexact
            # OpenCV's BT.601 conversion is ~10x faster than letting swscale do it
            picture = av.VideoFrame.from_ndarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2YUV_I420), format="yuv420p")
            picture.pts = frame_index
            container.mux(video.encode(picture))
        if video is None:
            raise ValueError("no frames to encode")
        container.mux(video.encode(None))
        if audio is not None:
            samples = np.asarray(audio, np.float32).reshape(-1)
            chunk = 1024  # the AAC frame size
            for start in range(0, len(samples), chunk):
                block = samples[start:start + chunk]
                sound_frame = av.AudioFrame.from_ndarray(block[None, :], format="fltp", layout="mono")
                sound_frame.sample_rate, sound_frame.pts = sample_rate, start
                container.mux(sound.encode(sound_frame))
            container.mux(sound.encode(None))


def write_clip(path: str | os.PathLike, *, speaker: Speaker | None = None, s_face: float = 0.0,
               s_voice: float = 0.0, duration: float = 3.0, size: tuple = SIZE, fps: float = FPS,
               seed: int = 0, index: int = 0, with_audio: bool = True, audio_gain: float = 1.0,
               sample_rate: int = SAMPLE_RATE, crf: int = CRF) -> None:
    """Render and encode one clip; (seed, index) pick its random details (syllables, blinks, motion).
    Defaults give a neutral 3 s clip of speaker spk01 of seed 0. For tests of broken inputs:
    with_audio=False writes a video-only mp4, audio_gain=0 an all-zero (silent) audio track."""
    if speaker is None:
        speaker = make_speakers(seed)[0]
    width, height = size
    if width % 2 or height % 2:
        raise ValueError(f"frame size must be even for yuv420p, got {width}x{height}")
    # separate generators for the syllables (shared by voice and mouth), the voice and the face,
    # so the video is the same with or without an audio track
    syl = plan_syllables(duration, s_voice, speaker, rng_for(seed, STREAM_RENDER, index, 0))
    audio = None
    if with_audio:
        audio = synth_voice(duration, s_voice, speaker, syl, rng_for(seed, STREAM_RENDER, index, 1), sample_rate)
        audio *= np.float32(audio_gain)
    frames = render_frames(speaker, s_face, syl, duration, size, fps, rng_for(seed, STREAM_RENDER, index, 2))
    encode_mp4(path, frames, fps, audio, sample_rate, crf)


# -----------------------------------------------------------------------------
# the corpus


def _write_planned(out: Path, clip: ClipPlan, speaker: Speaker, seed: int, size: tuple, fps: float) -> None:
    folder = out / "Raw" / clip.video_id
    folder.mkdir(parents=True, exist_ok=True)
    write_clip(folder / f"{clip.clip_id}.mp4", speaker=speaker, s_face=clip.s_face, s_voice=clip.s_voice,
               duration=clip.duration, size=size, fps=fps, seed=seed, index=clip.index)


def generate_corpus(out: str | os.PathLike, n_clips: int, seed: int = 0, size: tuple = SIZE, fps: float = FPS,
                    jobs: int = 1, n_speakers: int = N_SPEAKERS, progress: bool = False) -> pd.DataFrame:
    """Write the corpus under `out` and return its label rows (video_id,clip_id,text,label,mode).
    jobs > 1 runs clips through joblib (worker processes unless a joblib.parallel_config says
    otherwise); the files do not depend on it. Stale clips under <out>/Raw from an earlier,
    larger run are removed."""
    out = Path(out)
    speakers, clips = plan_corpus(n_clips, seed, n_speakers)
    by_id = {s.video_id: s for s in speakers}
    out.mkdir(parents=True, exist_ok=True)
    wanted = {out / "Raw" / c.video_id / f"{c.clip_id}.mp4" for c in clips}
    for old in sorted((out / "Raw").glob("*/*.mp4")) if (out / "Raw").is_dir() else []:
        if old not in wanted:
            old.unlink()
    tasks = [(out, c, by_id[c.video_id], seed, tuple(size), fps) for c in clips]
    if jobs == 1:
        for i, task in enumerate(tasks):
            _write_planned(*task)
            if progress and (i + 1) % 50 == 0:
                print(f"  {i + 1}/{len(tasks)} clips", flush=True)
    else:
        from joblib import Parallel, delayed
        Parallel(n_jobs=jobs, verbose=5 if progress else 0)(delayed(_write_planned)(*task) for task in tasks)
    for folder in (out / "Raw").iterdir() if (out / "Raw").is_dir() else []:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return write_tables(out, clips)


def write_tables(out: Path, clips: list) -> pd.DataFrame:
    """label.csv and components.csv of the planned clips (no media); returns the label rows."""
    order = sorted(clips, key=lambda c: (c.video_id, int(c.clip_id)))
    labels = pd.DataFrame([{"video_id": c.video_id, "clip_id": c.clip_id, "text": c.text, "label": c.label,
                            "mode": c.mode} for c in order], columns=["video_id", "clip_id", "text", "label", "mode"])
    labels.to_csv(out / "label.csv", index=False, float_format="%.1f", lineterminator="\n")
    components = pd.DataFrame([{"video_id": c.video_id, "clip_id": c.clip_id, **{k: getattr(c, k) for k in (
        "s_text", "s_face", "s_voice", "duration")}} for c in order])
    components.to_csv(out / "components.csv", index=False, float_format="%.4f", lineterminator="\n")
    return labels


def _parse_size(text: str) -> tuple:
    width, height = (int(v) for v in text.lower().split("x"))
    return width, height


def parser() -> argparse.ArgumentParser:
    """The command line; its defaults make the committed demo corpus."""
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="raw/demo", help="corpus root (label.csv + Raw/)")
    parser.add_argument("--clips", type=int, default=N_CLIPS, help=f"default {N_CLIPS}: the committed demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speakers", type=int, default=N_SPEAKERS)
    parser.add_argument("--size", type=_parse_size, default=SIZE, help="WxH, even numbers (default 320x240)")
    parser.add_argument("--fps", type=float, default=FPS)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes (output does not depend on it)")
    return parser


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    start = time.perf_counter()
    labels = generate_corpus(args.out, args.clips, args.seed, args.size, args.fps, args.jobs, args.speakers,
                             progress=True)
    seconds = time.perf_counter() - start
    counts = labels["mode"].value_counts().to_dict()
    print(f"wrote {len(labels)} clips to {args.out} in {seconds:.1f} s ({seconds / max(1, len(labels)):.3f} s/clip); "
          f"splits {counts}; label mean {labels['label'].mean():+.2f} sd {labels['label'].std():.2f} "
          f"range [{labels['label'].min():+.1f}, {labels['label'].max():+.1f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
