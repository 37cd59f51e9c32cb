"""Media I/O with PyAV: probing containers (metadata only) and decoding.

PyAV bundles FFmpeg's libraries, so no ffmpeg binary is needed. Probing reads
container and stream headers only — never a full decode — so `prepare` stays
fast on large corpora; a clip that probes fine but fails mid-decode is caught
per clip by the feature stages.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from pathlib import Path

import av

VIDEO_EXTS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".flv")
AUDIO_EXTS = (".wav", ".flac", ".mp3", ".m4a", ".aac", ".ogg")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class MediaError(Exception):
    """A media file that cannot be used; the message is the one-line reject reason."""


@dataclass
class VideoInfo:
    duration: float          # seconds
    fps: float
    width: int
    height: int
    has_audio: bool
    audio_sample_rate: int   # 0 when there is no audio track
    audio_channels: int


@dataclass
class AudioInfo:
    duration: float
    sample_rate: int
    channels: int


def _stream_duration(stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _channels(codec_context) -> int:
    layout = getattr(codec_context, "layout", None)
    if layout is not None and getattr(layout, "nb_channels", 0):
        return int(layout.nb_channels)
    return int(getattr(codec_context, "channels", 0) or 0)


def _open(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise MediaError("missing media file")
    if path.stat().st_size == 0:
        raise MediaError("zero-length media file")
    try:
        return av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as err:
        with open(path, "rb") as f:
            head = f.read(12)
        # An ISO-BMFF signature that fails to open is a cut-off file: mp4 writers put the
        # index (moov) last, so a truncated download or copy loses it.
        if head[4:8] == b"ftyp":
            raise MediaError(f"truncated or corrupt mp4 container ({err.__class__.__name__})") from None
        raise MediaError(f"unreadable media file, not a known container ({err.__class__.__name__})") from None


def probe_video(path: str | Path) -> VideoInfo:
    """Container metadata of a video clip; raises MediaError with a one-line reason."""
    with _open(path) as container:
        if not container.streams.video:
            raise MediaError("no video stream")
        video = container.streams.video[0]
        ctx = video.codec_context
        if not ctx.width or not ctx.height:
            raise MediaError("video stream has no frame size (truncated or corrupt header)")
        fps = float(video.average_rate or video.guessed_rate or 0)
        duration = _stream_duration(video)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        if not duration or duration <= 0:
            raise MediaError("video has zero duration")
        if fps <= 0:
            raise MediaError("video has no frame rate")
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            duration=float(duration), fps=fps, width=int(ctx.width), height=int(ctx.height),
            has_audio=audio is not None,
            audio_sample_rate=int(audio.codec_context.sample_rate or 0) if audio else 0,
            audio_channels=_channels(audio.codec_context) if audio else 0,
        )


def probe_audio(path: str | Path) -> AudioInfo:
    """Container metadata of an audio file (wav, flac, ...)."""
    with _open(path) as container:
        if not container.streams.audio:
            raise MediaError("no audio stream")
        audio = container.streams.audio[0]
        duration = _stream_duration(audio)
        if duration is None and container.duration is not None:
            duration = container.duration / av.time_base
        if not duration or duration <= 0:
            raise MediaError("audio has zero duration")
        return AudioInfo(float(duration), int(audio.codec_context.sample_rate or 0), _channels(audio.codec_context))


def probe_image(path: str | Path) -> tuple[int, int]:
    """(width, height) of a still image, read from its header."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.exists():
        raise MediaError("missing media file")
    if path.stat().st_size == 0:
        raise MediaError("zero-length media file")
    try:
        with Image.open(path) as im:
            return im.size
    except (UnidentifiedImageError, OSError) as err:
        raise MediaError(f"unreadable image ({err})") from None


def as_dict(info) -> dict:
    return asdict(info)
